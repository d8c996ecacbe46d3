"""TFDS builder `procedural_driving`: the procedural dash-cam clips as a real dataset.

Every clip is `videoldm_jax.data.procedural.make_clip(index, T, H, W, seed)`, so the
dataset is a pure function of its BuilderConfig: building it twice gives identical
examples, and tests can compare what they read back against `make_clip` directly.
Nothing is downloaded, and TensorFlow is not needed: examples are written as array_record
and read back with `builder.as_data_source(split)`, which plugs into
`grain.MapDataset.source` (see `videoldm_jax.data.grain_pipeline`).

Features of one example:
  'video'        uint8 (T, H, W, 3), zlib-compressed on disk (the procedural frames are
                 large flat regions, so zlib shrinks them several times over)
  'caption'      Text (bytes when read through a data source)
  'time_of_day'  ClassLabel ['day', 'night']
  'crowdedness'  ClassLabel, 4 classes: number of other cars 0..3
  'index'        int64, the global clip index given to make_clip

Splits: 'train' holds clip indices [0, num_train), 'validation' holds
[num_train, num_train + num_validation): disjoint scenes from the same seeded stream.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from videoldm_jax.data.procedural import MAX_CARS, make_clip


@dataclasses.dataclass
class ProceduralDrivingConfig(tfds.core.BuilderConfig):
  """Clip geometry and split sizes. `fps` is the nominal frame rate the clips are meant to
  be played (and conditioned) at; the renderer itself works in frames."""
  num_frames: int = 16
  height: int = 64
  width: int = 64
  fps: float = 8.0
  num_train: int = 64
  num_validation: int = 16
  seed: int = 0


def _config(name, description, **kwargs):
  return ProceduralDrivingConfig(name=name, description=description, **kwargs)


BUILDER_CONFIGS = [
  # Unit tests and the demo: builds in about two seconds on one core. 32 frames: the
  # demo's key frames are 4 frames apart (8 key frames span 29).
  _config("tiny", "64 + 16 clips of 32 frames at 64x64.", num_frames=32, height=64,
          width=64, fps=8.0, num_train=64, num_validation=16),
  # The small training configs (keyframe_tiny-sized models); builds in well under a minute.
  _config("small", "512 + 64 clips of 32 frames at 128x128.", num_frames=32, height=128,
          width=128, fps=8.0, num_train=512, num_validation=64),
  # A full-resolution stand-in for a real driving set: ~0.15 s per clip on one core
  # (~11 min to build), ~1.1 GB on disk (zlib shrinks these frames ~25x).
  _config("base", "4096 + 256 clips of 32 frames at 256x256.", num_frames=32, height=256,
          width=256, fps=8.0, num_train=4096, num_validation=256),
]


class ProceduralDriving(tfds.core.GeneratorBasedBuilder):
  """Deterministic procedural dash-cam clips with captions and labels."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "tiny: 32-frame clips (were 16); no car starts nearer than "
                            "its lane keeps in frame (some were cut by the edge)."}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = "tiny"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 resolves the code path of a builder that lives in a package through
    # `importlib_resources`, which it only declares as a dependency on Python < 3.9, so
    # on 3.11 it fails with ModuleNotFoundError. This file's own path is the same answer.
    return epath.Path(__file__)

  def __init__(self, **kwargs):
    # array_record, not TFDS's default tfrecord: tfrecord writing needs TensorFlow, and
    # array_record gives the random access Grain needs.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
          "video": tfds.features.Tensor(shape=(c.num_frames, c.height, c.width, 3),
                                        dtype=np.uint8, encoding="zlib"),
          "caption": tfds.features.Text(),
          "time_of_day": tfds.features.ClassLabel(names=["day", "night"]),
          "crowdedness": tfds.features.ClassLabel(num_classes=MAX_CARS + 1),
          "index": tfds.features.Scalar(dtype=np.int64),
        }),
        metadata=tfds.core.MetadataDict(fps=c.fps, seed=c.seed),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {
      "train": self._generate_examples(0, c.num_train),
      "validation": self._generate_examples(c.num_train, c.num_train + c.num_validation),
    }

  def _generate_examples(self, start: int, stop: int):
    c = self.builder_config
    for index in range(start, stop):
      video, labels, caption = make_clip(index, c.num_frames, c.height, c.width, c.seed)
      yield index, {
        "video": video,
        "caption": caption,
        "time_of_day": labels["time_of_day"],
        "crowdedness": labels["crowdedness"],
        "index": index,
      }


def build(config_name: str = "tiny", data_dir: str | None = None,
          overwrite: bool = False) -> ProceduralDriving:
  """Builds (or reuses) config `config_name` under `data_dir`; returns the builder.

  Read it with `builder.as_data_source('train')` (a random-access sequence of dicts), or
  later, without this module's builder object, with
  `tfds.data_source('procedural_driving/<config>', data_dir=data_dir, download=False)`
  after importing this module.
  """
  names = [c.name for c in BUILDER_CONFIGS]
  if config_name not in names:
    raise ValueError(f"procedural_driving: unknown config {config_name!r}, expected one of "
                     f"{names}")
  builder = ProceduralDriving(config=config_name, data_dir=data_dir)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  # try_download_gcs=False: TFDS would otherwise look for a prebuilt copy on GCS, and
  # these machines have no network. Statistics need TensorFlow, so they are skipped.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=mode, try_download_gcs=False,
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
