"""The procedural_driving TFDS builder: builds offline, reads back exactly what make_clip
renders, and plugs into Grain (without TensorFlow)."""

import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines.procedural_driving import BUILDER_CONFIGS, ProceduralDriving, build  # noqa: E402
from data_pipelines.procedural_driving.__main__ import main as cli_main  # noqa: E402
from videoldm_jax.data.procedural import make_clip  # noqa: E402

TINY = next(c for c in BUILDER_CONFIGS if c.name == "tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(builder, data_dir) of the tiny config, built once for this module (~1 s)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return build("tiny", data_dir), data_dir


def test_tensorflow_is_not_needed():
  # The whole point of array_record + Tensor features: nothing here may pull in TF.
  import sys
  assert "tensorflow" not in sys.modules


def test_configs_are_distinct_and_sane():
  names = [c.name for c in BUILDER_CONFIGS]
  assert names == ["tiny", "small", "base"]
  assert (TINY.num_train, TINY.num_frames, TINY.height, TINY.width) == (64, 32, 64, 64)
  for c in BUILDER_CONFIGS:
    assert c.num_train > 0 and c.num_validation > 0 and c.fps > 0


def test_info_features_and_splits(tiny):
  builder, _ = tiny
  info = builder.info
  assert info.name == "procedural_driving"
  assert info.splits["train"].num_examples == TINY.num_train
  assert info.splits["validation"].num_examples == TINY.num_validation
  f = info.features
  assert f["video"].shape == (TINY.num_frames, TINY.height, TINY.width, 3)
  assert f["video"].np_dtype == np.uint8  # `.dtype` would try to import TensorFlow
  assert f["time_of_day"].names == ["day", "night"]
  assert f["crowdedness"].num_classes == 4
  assert info.metadata["fps"] == TINY.fps
  files = os.listdir(builder.data_dir)
  assert any("train.array_record" in name for name in files), files


@pytest.mark.parametrize("split,start,count", [("train", 0, TINY.num_train),
                                               ("validation", TINY.num_train,
                                                TINY.num_validation)])
def test_read_back_equals_make_clip(tiny, split, start, count):
  builder, _ = tiny
  source = builder.as_data_source(split)
  assert len(source) == count
  seen = set()
  for i in range(len(source)):
    ex = source[i]
    index = int(ex["index"])
    seen.add(index)
    video, labels, caption = make_clip(index, TINY.num_frames, TINY.height, TINY.width,
                                       TINY.seed)
    assert ex["video"].dtype == np.uint8
    np.testing.assert_array_equal(ex["video"], video)
    assert int(ex["time_of_day"]) == labels["time_of_day"]
    assert int(ex["crowdedness"]) == labels["crowdedness"]
    assert ex["caption"].decode("utf-8") == caption
  # Splits are disjoint ranges of the same seeded stream.
  assert seen == set(range(start, start + count))


def test_labels_are_not_degenerate(tiny):
  builder, _ = tiny
  source = builder.as_data_source("train")
  tod = {int(source[i]["time_of_day"]) for i in range(len(source))}
  crowd = {int(source[i]["crowdedness"]) for i in range(len(source))}
  assert tod == {0, 1} and len(crowd) >= 3


def test_rebuild_reuses_the_existing_dataset(tiny):
  builder, data_dir = tiny
  path = os.path.join(builder.data_dir, "dataset_info.json")
  before = os.path.getmtime(path)
  again = build("tiny", data_dir)
  assert os.path.getmtime(path) == before
  assert again.info.splits["train"].num_examples == TINY.num_train
  # overwrite=True builds again (the file is written anew: its time set back is lost).
  os.utime(path, (0, 0))
  again = build("tiny", data_dir, overwrite=True)
  assert os.path.getmtime(path) > 0
  assert again.info.splits["train"].num_examples == TINY.num_train


def test_data_source_by_name(tiny):
  _, data_dir = tiny
  # Importing data_pipelines.procedural_driving registered the builder with TFDS.
  sources = tfds.data_source("procedural_driving/tiny", data_dir=data_dir, download=False)
  assert len(sources["train"]) == TINY.num_train


def test_grain_reads_the_data_source(tiny):
  import grain
  builder, _ = tiny
  ds = grain.MapDataset.source(builder.as_data_source("validation")).seed(0).shuffle()
  indices = sorted(int(ex["index"]) for ex in ds)
  assert indices == list(range(TINY.num_train, TINY.num_train + TINY.num_validation))


def test_cli_builds(tiny, capsys):
  _, data_dir = tiny
  cli_main(["--config=tiny", f"--data_dir={data_dir}"])
  out = capsys.readouterr().out
  assert "procedural_driving/tiny" in out and "'train': 64" in out
  with pytest.raises(SystemExit) as exit_info:
    cli_main(["--config=huge", f"--data_dir={data_dir}"])
  assert exit_info.value.code not in (0, None)


def test_cli_writes_reference_clips_at_the_training_size(tiny, tmp_path):
  # FVD reference clips at the size the models are trained and sampled at (the demo's
  # 32x32): the stored 64x64 ones measured the resize, not the model.
  from videoldm_jax.data.grain_pipeline import resize_and_crop
  builder, data_dir = tiny
  # (32 x 48: height and width told apart)
  cli_main(["--config=tiny", f"--data_dir={data_dir}", f"--write_clips={tmp_path}",
            "--split=validation", "--max_clips=2", "--height=32", "--width=48"])
  stored = builder.as_data_source("validation")[1]["video"]
  clip = np.load(tmp_path / "validation_00001.npy")
  assert stored.shape[1:3] == (TINY.height, TINY.width) != clip.shape[1:3] == (32, 48)
  np.testing.assert_array_equal(clip, resize_and_crop(np.asarray(stored), 32, 48, "center"))
  assert sorted(p.name for p in tmp_path.glob("*.npy")) == [
      "validation_00000.npy", "validation_00001.npy"]  # --max_clips=2
  with pytest.raises(SystemExit) as exit_info:
    cli_main(["--config=tiny", f"--data_dir={data_dir}", f"--write_clips={tmp_path}",
              "--height=32"])
  assert exit_info.value.code not in (0, None)


def test_unknown_config_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown config 'huge'"):
    build("huge", str(tmp_path))


def test_metadata_json_is_plain(tiny):
  builder, _ = tiny
  with open(os.path.join(builder.data_dir, "metadata.json")) as f:
    assert json.load(f) == {"fps": TINY.fps, "seed": TINY.seed}
  assert issubclass(ProceduralDriving, tfds.core.GeneratorBasedBuilder)


def test_the_trainer_builds_and_reads_the_config_data_tfds_config_names(tmp_path,
                                                                        monkeypatch):
  # config.data.tfds_config picks the BuilderConfig the trainer's input builds and reads.
  # Every test config named "tiny", the default: an input that dropped it passed them all.
  # A test-only config (4 clips of 4 frames at 16x24, seed 5) keeps this to a second.
  import importlib

  import data_pipelines.procedural_driving.procedural_driving as module
  from videoldm_jax.data import inputs
  mini = module._config("mini", "3 + 1 clips of 4 frames at 16x24.", num_frames=4,
                        height=16, width=24, num_train=3, num_validation=1, seed=5)
  monkeypatch.setattr(module, "BUILDER_CONFIGS", [*BUILDER_CONFIGS, mini])
  monkeypatch.setitem(ProceduralDriving.builder_configs, "mini", mini)
  config = importlib.import_module("configs.keyframe_tiny").get_config()
  config.data.update(kind="procedural_driving", tfds_config="mini",
                     data_dir=str(tmp_path / "tfds"), batch_size=3, num_frames=4,
                     height=16, width=24, crop="center")
  batch = next(inputs.make_iterator(config, tmp_path, {}, alone=True))
  assert (tmp_path / "tfds" / "procedural_driving" / "mini").is_dir()
  # One epoch of the 3 train clips, each stored at the config's size (resized, clips of
  # another config would differ).
  clips = [make_clip(i, 4, 16, 24, 5)[0] for i in range(3)]
  found = sorted(i for v in batch["video"] for i, c in enumerate(clips)
                 if np.array_equal(v, c))
  assert found == [0, 1, 2]


def test_a_process_other_than_0_reading_alone_never_builds(tiny, tmp_path, monkeypatch):
  # make_iterator(alone=True) has no barrier. Process 1 of 2 built the dataset itself
  # there, racing process 0's build of the same folder (two builds at once: the second
  # rename into place failed with FileExistsError, measured).
  import jax
  import ml_collections
  import data_pipelines.procedural_driving as package
  from videoldm_jax.data import inputs
  builds = []
  monkeypatch.setattr(package, "build", lambda *a, **k: builds.append(a))
  monkeypatch.setattr(jax, "process_index", lambda *a: 1)
  monkeypatch.setattr(jax, "process_count", lambda *a: 2)
  data = ml_collections.ConfigDict(dict(kind="procedural_driving", num_frames=4,
                                        data_dir=str(tmp_path / "tfds")))
  with pytest.raises(FileNotFoundError, match=r"no built procedural_driving/tiny dataset, "
                     r"and process 1 of 2 reads it alone \(no barrier\): only process 0 "
                     "builds it"):
    inputs._tfds_source(data, tmp_path, alone=True)
  # A half-built one (TFDS's incomplete.* folder, renamed into place when done) is none.
  building = tmp_path / "tfds" / "procedural_driving" / "tiny" / (
      f"incomplete.x_{ProceduralDriving.VERSION}")
  building.mkdir(parents=True)
  (building / "dataset_info.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no built procedural_driving/tiny"):
    inputs._tfds_source(data, tmp_path, alone=True)
  # A built one is read as it is.
  data.data_dir = tiny[1]
  assert len(inputs._tfds_source(data, tmp_path, alone=True)) == TINY.num_train
  assert builds == []
  # Process 0 reading alone still builds (a built dataset is kept).
  monkeypatch.setattr(jax, "process_index", lambda *a: 0)
  inputs._tfds_source(data, tmp_path, alone=True)
  assert builds == [("tiny", tiny[1])]
