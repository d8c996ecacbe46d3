"""Inception-v3 for FID (pool3, 2048-d) and the Inception Score (logits), in Flax Linen.

Weights come from a user-supplied safetensors file in torchvision's `Inception3`
state-dict layout, which is also the layout of pytorch-fid's FID network
(`pt_inception-2015-12-05-6726825d.pth`, the TF FID Inception ported to PyTorch; its
FIDInception* blocks subclass torchvision's and keep the key names):

  Conv2d_1a_3x3.conv.weight (32, 3, 3, 3)         -> Conv2d_1a_3x3/conv/kernel (3, 3, 3, 32)
  Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var} -> .../bn/{scale,bias,mean,var}
  Mixed_5b.branch5x5_1.conv.weight ...             -> Mixed_5b/branch5x5_1/conv/kernel ...
  fc.weight (K, 2048), fc.bias (K,)                -> fc/kernel (2048, K), fc/bias

`AuxLogits.*` and `*.num_batches_tracked` are ignored. pytorch-fid ships a pickle:
convert it once to safetensors (`safetensors_io` prints the command).

Two variants, told apart by the class count when not given:
  "fid"          K = 1008: pytorch-fid's FID Inception, whose pools follow TF: the
                 3x3 average pools of Mixed_5*/6*/7b exclude the zero padding, and
                 Mixed_7c pools by max. This is the network of published FIDs.
  "torchvision"  K = 1000: torchvision's `inception_v3` (average pools count padding).

Input: frames resized to 299 x 299 with half-pixel bilinear (PyTorch's
`F.interpolate(bilinear, align_corners=False)`, as pytorch-fid), values in [-1, 1].
`width` scales every channel count (tests build small random networks with it).
"""

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.convert.safetensors_io import load_safetensors
from videoldm_jax.convert import torch_layout
from videoldm_jax.convert.torch_layout import ConversionError, load_state_dict
from videoldm_jax.eval.batching import BatchedApply
from videoldm_jax.eval.layers import (PRECISION, EvalBatchNorm, check_float_range,
                                      to_minus_one_one)
from videoldm_jax.eval.resize import resize_bilinear
from videoldm_jax.models.layers import FAN_IN_NORMAL, ZEROS, param_init

RESOLUTION = 299
VARIANTS = {"fid": 1008, "torchvision": 1000}
_IGNORED = (r"^AuxLogits\.", r"num_batches_tracked$")


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU, (B, H, W, C) -> (B, H', W', features)."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    (ph, pw), s = self.padding, self.stride
    y = nn.Conv(self.features, self.kernel, strides=(s, s), padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=PRECISION, param_dtype=jnp.float32,
                kernel_init=param_init(FAN_IN_NORMAL,
                                       ("conv_kh", "conv_kw", "conv_in", "conv_out")),
                name="conv")(x)
    return nn.relu(EvalBatchNorm(1e-3, use_scale=True, name="bn")(y))


def _avg_pool_3x3(x, tf_style: bool):
  # TF's SAME average pool divides by the number of real (unpadded) pixels.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=not tf_style)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def basic_conv(width: float, name: str, features: int, kernel=1, stride: int = 1,
               padding=0) -> BasicConv2d:
  """A BasicConv2d with `features * width` channels (at least 1); ints mean square."""
  return BasicConv2d(max(1, int(round(features * width))), _pair(kernel), stride,
                     _pair(padding), name=name)


class _Block(nn.Module):
  """Base of the Mixed_* blocks."""
  width: float = 1.0
  tf_pool: bool = True  # FID variant: TF-style pools (see module docstring)

  def conv(self, name: str, features: int, kernel=1, stride: int = 1,
           padding=0) -> BasicConv2d:
    return basic_conv(self.width, name, features, kernel, stride, padding)


class InceptionA(_Block):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48)(x))
    b3 = self.conv("branch3x3dbl_1", 64)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3(x, self.tf_pool))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
    bd = self.conv("branch3x3dbl_1", 64)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = self.conv("branch1x1", 192)(x)
    b7 = self.conv("branch7x7_1", c7)(x)
    b7 = self.conv("branch7x7_2", c7, **row)(b7)
    b7 = self.conv("branch7x7_3", 192, **col)(b7)
    bd = self.conv("branch7x7dbl_1", c7)(x)
    bd = self.conv("branch7x7dbl_2", c7, **col)(bd)
    bd = self.conv("branch7x7dbl_3", c7, **row)(bd)
    bd = self.conv("branch7x7dbl_4", c7, **col)(bd)
    bd = self.conv("branch7x7dbl_5", 192, **row)(bd)
    bp = self.conv("branch_pool", 192)(_avg_pool_3x3(x, self.tf_pool))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192)(x))
    b7 = self.conv("branch7x7x3_1", 192)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  max_pool: bool = False  # FID variant's Mixed_7c

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320)(x)
    b3 = self.conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
    bd = self.conv("branch3x3dbl_1", 448)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], -1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x, self.tf_pool)
    bp = self.conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """(B, H, W, 3) in [-1, 1], H, W >= 75 -> (pool3 (B, 2048 * width), logits (B, K))."""
  num_classes: int = 1008
  variant: str = "fid"
  width: float = 1.0

  @nn.compact
  def __call__(self, x_BxHxWx3: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown Inception variant {self.variant!r}; expected one of "
                       f"{sorted(VARIANTS)}")
    fid = self.variant == "fid"
    blk = dict(width=self.width, tf_pool=fid)
    conv = lambda *a, **k: basic_conv(self.width, *a, **k)  # noqa: E731
    x = conv("Conv2d_1a_3x3", 32, 3, stride=2)(x_BxHxWx3)
    x = conv("Conv2d_2a_3x3", 32, 3)(x)
    x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
    x = _max_pool_3x3_s2(x)
    x = conv("Conv2d_3b_1x1", 80)(x)
    x = conv("Conv2d_4a_3x3", 192, 3)(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(**blk, pool_features=32, name="Mixed_5b")(x)
    x = InceptionA(**blk, pool_features=64, name="Mixed_5c")(x)
    x = InceptionA(**blk, pool_features=64, name="Mixed_5d")(x)
    x = InceptionB(**blk, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x = InceptionC(**blk, channels_7x7=c7, name=name)(x)
    x = InceptionD(**blk, name="Mixed_7a")(x)
    x = InceptionE(**blk, name="Mixed_7b")(x)
    x = InceptionE(**blk, max_pool=fid, name="Mixed_7c")(x)
    pool3_BxF = jnp.mean(x, axis=(1, 2))
    logits_BxK = nn.Dense(self.num_classes, precision=PRECISION, param_dtype=jnp.float32,
                          kernel_init=param_init(FAN_IN_NORMAL, ("embed", "vocab")),
                          bias_init=param_init(ZEROS, ("vocab",)), name="fc")(pool3_BxF)
    return pool3_BxF, logits_BxK


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def _torch_key(path: tuple[str, ...]) -> str:
  """Our variable path -> torch key, e.g. ('batch_stats', 'Mixed_5b', 'branch1x1', 'bn',
  'mean') -> 'Mixed_5b.branch1x1.bn.running_mean'."""
  return ".".join(path[1:-1] + (_TORCH_LEAF[path[-1]],))


def abstract_variables(model: InceptionV3) -> dict[str, Any]:
  """Unboxed {'params', 'batch_stats'} shapes of `model`; nothing allocated."""
  x = jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))


def load_inception(path: str | os.PathLike, variant: str | None = None,
                   width: float | None = None) -> tuple[InceptionV3, dict]:
  """Inception-v3 model and variables from a torchvision-layout safetensors file.

  Args:
    path: .safetensors file (see module docstring for the layout).
    variant: "fid" or "torchvision"; None infers it from fc.weight's class count
      (1008 -> "fid", anything else -> "torchvision").
    width: channel multiplier the file was built with; None reads it from the stem
      (Conv2d_1a_3x3 has 32 * width filters): 1.0 for real weights.

  Returns:
    (model, {'params': ..., 'batch_stats': ...} of float32 numpy arrays).

  Raises:
    FileNotFoundError, PickleRefused (.pth / .pt given), ValueError (bad file), and
    ConversionError naming every missing, mis-shaped or unused key.
  """
  sd = load_safetensors(path)
  if "fc.weight" not in sd:
    raise ConversionError(f"{path}: no fc.weight; not an Inception-v3 state dict in "
                          f"torchvision layout (first keys: {sorted(sd)[:8]})")
  num_classes = int(sd["fc.weight"].shape[0])
  read_width = width is None
  if width is None:
    stem = sd.get("Conv2d_1a_3x3.conv.weight")
    width = 1.0 if stem is None else stem.shape[0] / 32
  if variant is None:
    variant = "fid" if num_classes == VARIANTS["fid"] else "torchvision"
  model = InceptionV3(num_classes=num_classes, variant=variant, width=width)
  abstract = abstract_variables(model)
  try:
    variables = load_state_dict(abstract, sd, what="Inception-v3", source=str(path),
                                key_fn=_torch_key, ignore=_IGNORED)
  except ConversionError as e:
    if not read_width or width == 1.0:
      raise
    # The stem's rounded filter count pins the width only to within 1/64: a network
    # built with another (e.g. 0.1) has other rounded counts in later layers.
    raise ConversionError(f"{e}\n(width {width} was read from the stem's "
                          f"{int(width * 32)} filters; pass the width the file was built "
                          "with)") from e
  return model, variables


def export_state_dict(variables: dict) -> dict[str, np.ndarray]:
  """Our variables -> torchvision-layout float32 state dict (inverse of `load_inception`)."""
  return {k: np.ascontiguousarray(v, np.float32)
          for k, v in torch_layout.export_state_dict(variables, _torch_key).items()}


@functools.lru_cache(maxsize=None)
def _features_fn(num_classes: int, variant: str, width: float, resolution: int):
  """(variables, frames) -> (pool3, logits); one function object per setting."""
  model = InceptionV3(num_classes, variant, width)

  def features(variables, frames):
    return model.apply(variables, resize_bilinear(to_minus_one_one(frames), resolution,
                                                  resolution))

  return features


class InceptionFeatures:
  """Frames (N, H, W, 3), uint8 or float in [-1, 1] -> (pool3 (N, 2048), logits (N, K)).

  Frames are resized to 299 x 299 (half-pixel bilinear, no antialias: pytorch-fid's
  resize) on the device; batched and data-parallel like `i3d.I3DFeatures`.
  """

  def __init__(self, weights_path: str | os.PathLike, batch_size: int = 64,
               variant: str | None = None, width: float | None = None,
               resolution: int = RESOLUTION,
               devices: Sequence[jax.Device] | None = None):
    self.model, variables = load_inception(weights_path, variant, width)
    # The classifier's bias, (K,): the Inception Score is defined on the logits without
    # it (improved-GAN's pool3 @ W; torch-fidelity's and torchmetrics' logits_unbiased).
    self.fc_bias = np.asarray(variables["params"]["fc"]["bias"], np.float32)
    self.resolution = int(resolution)
    fn = _features_fn(self.model.num_classes, self.model.variant, self.model.width,
                      self.resolution)
    self._runner = BatchedApply(fn, variables, batch_size, devices)

  def iterate(self, frames_NxHxWx3: np.ndarray, show_progress: bool = False):
    """Yields (pool3 (b, 2048), logits (b, K)) float32 batches."""
    if frames_NxHxWx3.ndim != 4 or frames_NxHxWx3.shape[-1] != 3:
      raise ValueError(f"expected frames of shape (N, H, W, 3), got {frames_NxHxWx3.shape}")
    check_float_range(frames_NxHxWx3)
    yield from self._runner.iterate(frames_NxHxWx3, show_progress, desc="Inception")

  def __call__(self, frames_NxHxWx3: np.ndarray, show_progress: bool = False):
    outs = list(self.iterate(frames_NxHxWx3, show_progress))
    if not outs:  # (zip of nothing: an empty tuple the caller failed to unpack)
      raise ValueError("no frames (N = 0)")
    return tuple(np.concatenate(o, axis=0) for o in zip(*outs))
