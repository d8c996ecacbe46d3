"""TFDS builder `ucf101_local`: UCF-101 action recognition from a local copy.

Input: the videos as unpacked from UCF101.rar (`UCF-101/<ClassName>/v_<ClassName>_gXX_cYY
.avi`) and the official lists (`ucfTrainTestlist/classInd.txt`, `trainlist0N.txt`,
`testlist0N.txt`). Builder configs `split_1`, `split_2`, `split_3` are the three
official train/test partitions; each has splits `train` and `test`. Examples carry the
features of `video_folder` (video uint8 (T, H, W, 3) zlib Tensor, caption, path,
num_frames, fps) plus `label`, a ClassLabel whose names are classInd.txt's in its order
(label = classInd index - 1). The caption is the readable class name ("apply eye
makeup"), so the clips also serve text-conditioned training and evaluation.

Named `ucf101_local`, not `ucf101`: TFDS ships its own `ucf101` (JPEG frames, other
features and configs), and registering the name twice fails.

Decoding, skipping and reporting are `data_pipelines.video_folder`'s: listed videos that
are missing or unusable are skipped and listed in `skipped.json` (each entry with its
split); a split left with no usable video fails the build with one clear error.
"""

import dataclasses
import os

import tensorflow_datasets as tfds

from data_pipelines.ucf101 import sources as ucf
from data_pipelines.video_folder import builder as vfb
from data_pipelines.video_folder import sources

__all__ = ["Ucf101Config", "SplitConfig", "Ucf101", "build"]

SPLITS = {"train": "trainlist{:02d}.txt", "test": "testlist{:02d}.txt"}


@dataclasses.dataclass(frozen=True)
class Ucf101Config(vfb.DecodeOptions):
  """Where the data is and how to decode it (recorded in metadata.json, like
  `VideoFolderConfig`; which official partition is the builder config).

  Attributes:
    videos_dir: the `UCF-101` folder (class folders of .avi files). Not needed to
      READ a built dataset.
    splits_dir: the `ucfTrainTestlist` folder.
    max_frames, frame_stride, target_fps, resize_short_side, min_frames: as in
      `VideoFolderConfig`.
  """
  videos_dir: str | None = None
  splits_dir: str | None = None


@dataclasses.dataclass(eq=False)
class SplitConfig(tfds.core.BuilderConfig):
  """A TFDS builder config per official partition: unlike the decode options, this
  one belongs in the on-disk path (`ucf101_local/split_2/1.0.0`), so the three
  partitions can sit side by side and be read by name."""
  split_number: int = 1


class Ucf101(vfb.SkipReportingBuilder):
  """Builds `ucf101_local`; see the module docstring.

  Build:  `build(root, data_dir, split_number=1, ...)`
  Read:   Ucf101(data_dir=D, split_number=1).as_data_source("test"), or
          tfds.data_source("ucf101_local/split_1", split="test", data_dir=D)
  """

  name = "ucf101_local"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "video_folder features plus label (classInd.txt order)."}
  BUILDER_CONFIGS = [SplitConfig(name=f"split_{n}", split_number=n,
                                 description=f"Official train/test partition {n}.")
                     for n in (1, 2, 3)]

  def __init__(self, *, data_dir=None, config=None, version=None,
               file_format="array_record", split_number: int | None = None,
               ucf_config: Ucf101Config | None = None, **options):
    """`options` are `Ucf101Config` fields (or pass a whole `ucf_config`);
    `split_number` (1..3) picks the config `split_<n>` (default 1). `config` /
    `version` are TFDS's own arguments, accepted so `tfds.builder` works."""
    if ucf_config is not None and options:
      raise TypeError(f"Ucf101: pass ucf_config or options {sorted(options)}, not both")
    if split_number is not None:
      if split_number not in (1, 2, 3):
        raise ValueError(f"Ucf101: split_number must be 1, 2 or 3, got {split_number}")
      if config is not None and str(getattr(config, "name", config)) != \
          f"split_{split_number}":
        raise ValueError(f"Ucf101: config {config} contradicts split_number="
                         f"{split_number}")
      config = f"split_{split_number}"
    cfg = ucf_config or Ucf101Config(**options)
    # Absolute, so metadata and messages say where the inputs were.
    self.ucf_config = dataclasses.replace(
        cfg, videos_dir=cfg.videos_dir and os.path.abspath(cfg.videos_dir),
        splits_dir=cfg.splits_dir and os.path.abspath(cfg.splits_dir))
    self._class_names = None
    if self.ucf_config.splits_dir:  # needed by _info, which TFDS calls in __init__
      self._class_names = ucf.read_class_index(self._class_index_path())
    self._results = {}  # split -> (examples kept, skips), for the report
    super().__init__(data_dir=data_dir, config=config, version=version,
                     file_format=file_format or "array_record")

  def _class_index_path(self) -> str:
    return os.path.join(self.ucf_config.splits_dir, "classInd.txt")

  def _info(self) -> tfds.core.DatasetInfo:
    # Without the lists (reading a built dataset) the names come from the label
    # feature's labels file in the data folder. With them, classInd.txt wins, even
    # over an older build in data_dir (TFDS doesn't compare): the new build uses it.
    label = (tfds.features.ClassLabel(names=self._class_names) if self._class_names
             else tfds.features.ClassLabel())
    return self.dataset_info_from_configs(
        description="UCF-101 action videos (decoded uint8 frames) with class labels "
                    "and class-name captions, built from a local copy.",
        features=vfb.video_features(label=label),
        supervised_keys=("video", "label"),
        homepage="https://www.crcv.ucf.edu/data-sets/ucf101/",
        # Overwritten from metadata.json when reading a built dataset.
        metadata=tfds.core.MetadataDict(build_options=self.build_options()),
    )

  def build_options(self) -> dict:
    return dict(dataclasses.asdict(self.ucf_config),
                split_number=self.builder_config.split_number)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the videos are local
    cfg = self.ucf_config
    if not cfg.videos_dir or not cfg.splits_dir:
      raise ValueError("Ucf101: videos_dir and splits_dir are both needed to build "
                       "(reading a built dataset needs only data_dir)")
    if not os.path.isdir(cfg.videos_dir):
      raise FileNotFoundError(f"{cfg.videos_dir}: UCF-101 videos folder does not exist")
    finder = ucf.FileFinder(cfg.videos_dir)
    generators = {}
    # Every list is read before anything is decoded, so a bad list fails at once.
    for split, pattern in SPLITS.items():
      list_path = os.path.join(cfg.splits_dir,
                               pattern.format(self.builder_config.split_number))
      entries, skips = ucf.read_split_list(list_path, self._class_names,
                                           self._class_index_path())
      generators[split] = self._generate_examples(split, list_path, entries, skips,
                                                  finder)
    return generators

  def _generate_examples(self, split, list_path, entries, skips, finder):
    """Yields (path, example) for one split; bad entries are appended to `skips`."""
    cfg, list_name = self.ucf_config, os.path.basename(list_path)
    captions = [ucf.class_caption(name) for name in self._class_names]

    def items():
      found = {}  # path on disk -> the list line that named it first
      for entry in entries:
        rel = finder.find(entry.rel)
        if rel is None:
          skips.append(sources.Skip(entry.rel, sources.MISSING_FILE, f"listed in "
                                    f"{list_name} line {entry.line} but no such file"))
          continue
        if rel in found:
          # Two spellings of one file (the case-blind match): the second would be an
          # example key TFDS has already seen, which fails the whole build.
          skips.append(sources.Skip(entry.rel, ucf.DUPLICATE_ENTRY, f"{list_name} line "
                                    f"{entry.line} names the file of line {found[rel]} "
                                    f"({rel}); first kept"))
          continue
        found[rel] = entry.line
        yield rel, os.path.join(cfg.videos_dir, *rel.split("/")), {
            "caption": captions[entry.label], "label": entry.label}

    kept = yield from vfb.decode_examples(items(), skips, cfg)
    if not kept:
      # Raised before TFDS finalises anything, so no half-written dataset remains.
      raise vfb.no_usable_video_error(
          cfg.videos_dir, skips, f"split {split!r}: none of the {len(entries)} video(s) "
          f"listed in {list_path} could be used", dataset=self.name)
    self._results[split] = (kept, skips)
    self._update_report()

  def _update_report(self):
    """The report over the splits generated so far (complete after the last one)."""
    cfg, results = self.ucf_config, self._results
    tagged = sorted(((s.path, split, s) for split, (_, skips) in results.items()
                     for s in skips), key=lambda t: (t[0], t[1], t[2].reason))
    self.report = vfb.skip_report(
        [s for _, _, s in tagged], sum(kept for kept, _ in results.values()),
        source_dir=cfg.videos_dir, splits_dir=cfg.splits_dir,
        split_number=self.builder_config.split_number,
        num_examples_by_split={split: kept for split, (kept, _) in results.items()})
    # The same file can fail in both splits of a custom list: say which one.
    self.report["skipped"] = [dict(dataclasses.asdict(s), split=split)
                              for _, split, s in tagged]


def build(root: str | None, data_dir: str, *, split_number: int = 1,
          videos_dir: str | None = None, splits_dir: str | None = None,
          overwrite: bool = False, **options) -> Ucf101:
  """Builds `ucf101_local/split_<split_number>` into `data_dir` and returns the
  builder (`.as_data_source("train")` / `("test")` read it; `.report` is what
  skipped.json holds).

  `root` holds `UCF-101/` and `ucfTrainTestlist/`; `videos_dir` / `splits_dir` point
  elsewhere (either may replace `root`). `options` are the other `Ucf101Config`
  fields (max_frames, frame_stride, target_fps, resize_short_side, min_frames). An
  existing build raises FileExistsError unless `overwrite=True`.
  """
  if root is None and not (videos_dir and splits_dir):
    raise ValueError("ucf101: give root, or both videos_dir and splits_dir")
  videos_dir = videos_dir or os.path.join(root, "UCF-101")
  splits_dir = splits_dir or os.path.join(root, "ucfTrainTestlist")
  builder = Ucf101(data_dir=data_dir, split_number=split_number, videos_dir=videos_dir,
                   splits_dir=splits_dir, **options)
  vfb.prepare(builder, overwrite=overwrite)
  return builder
