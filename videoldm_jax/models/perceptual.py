"""LPIPS-style perceptual distance on VGG16 features (the perceptual term of SD's KL
autoencoder loss, taming's `LPIPS`), with weights from a user-supplied safetensors file.

Nothing is downloaded. The file holds torchvision's `vgg16().features` state dict
(`features.{0,2,5,...,28}.weight/bias`, OIHW), e.g. written once with
  python -c "import torchvision, safetensors.torch as st; m = torchvision.models.vgg16(
      weights='IMAGENET1K_V1'); st.save_file({'features.' + k: v for k, v in
      m.features.state_dict().items()}, 'vgg16_features.safetensors')"
and optionally LPIPS' learned channel weights `lin{0..4}.model.1.weight` (1, C, 1, 1)
(from the lpips package's `vgg.pth`, converted the same way). Without them every
channel weighs 1 (LPIPS' `lpips=False` baseline). Channel widths are read from the file,
so a small VGG-shaped network works too (the tests use one).

distance(x, y) = sum over the 5 stages k of mean over pixels of
  sum_c w_kc (f_k(x) / |f_k(x)| - f_k(y) / |f_k(y)|)^2_c,
f_k the relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 activations, |.| the norm over
channels; inputs in [-1, 1] are first shifted/scaled as LPIPS does.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from videoldm_jax.convert.safetensors_io import load_safetensors

# torchvision's vgg16().features: conv indices of each stage (a 2x2 max-pool precedes
# every stage but the first); LPIPS reads the ReLU after each stage's last conv.
STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
# LPIPS' ScalingLayer: (x - shift) / scale maps [-1, 1] inputs to ImageNet statistics.
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# Smallest image side `distance` takes: four 2x2 pools leave the last stage one pixel.
MIN_SIZE = 16


def load_vgg16(path: str) -> dict:
  """safetensors file -> {'features_i': {'kernel' (3, 3, I, O), 'bias' (O,)},
  ['lin_k': {'kernel' (C_k,)}]} as float32 NumPy arrays (see the module doc)."""
  tensors = load_safetensors(path)
  params = {}
  # Every shape checked here, each layer's input against the one before: a file that
  # loaded with wrong shapes failed at the first traced step naming neither file nor
  # tensor, and a bias of shape (1,) broadcast over every channel without an error.
  cin, stage_out = 3, []
  for stage in STAGES:
    for i in stage:
      w, b = tensors.get(f"features.{i}.weight"), tensors.get(f"features.{i}.bias")
      if w is None or b is None:
        raise ValueError(f"{path}: missing features.{i}.weight/bias; expected the "
                         "torchvision vgg16().features state dict with 'features.' "
                         "prefixed keys (see videoldm_jax/models/perceptual.py)")
      if w.ndim != 4 or w.shape[1:] != (cin, 3, 3):
        raise ValueError(f"{path}: features.{i}.weight has shape {tuple(w.shape)}, "
                         f"expected (out, {cin}, 3, 3)")
      if tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{path}: features.{i}.bias has shape {tuple(b.shape)}, "
                         f"expected ({w.shape[0]},)")
      params[f"features_{i}"] = {"kernel": np.asarray(w, np.float32).transpose(2, 3, 1, 0),
                                 "bias": np.asarray(b, np.float32)}
      cin = w.shape[0]
    stage_out.append(cin)
  lins = [tensors.get(f"lin{k}.model.1.weight") for k in range(len(STAGES))]
  if any(x is not None for x in lins):
    if any(x is None for x in lins):
      raise ValueError(f"{path}: has some but not all of lin0..lin4.model.1.weight")
    for k, w in enumerate(lins):
      if w.size != stage_out[k]:  # (1, C, 1, 1) in LPIPS' files; read as (C,)
        raise ValueError(f"{path}: lin{k}.model.1.weight has shape {tuple(w.shape)}, "
                         f"expected (1, {stage_out[k]}, 1, 1): one weight per channel of "
                         f"stage {k}")
      params[f"lin_{k}"] = {"kernel": np.asarray(w, np.float32).reshape(-1)}
  return params


def logical_axes(params: dict) -> dict:
  """PartitionSpecs for the tree of `load_vgg16` (conv kernels like the models')."""
  def spec(path, x):
    name = path[-1].key
    if name == "kernel" and x.ndim == 4:
      return PartitionSpec("conv_kh", "conv_kw", "conv_in", "conv_out")
    return PartitionSpec("conv_out") if name == "bias" else PartitionSpec(None)
  return jax.tree_util.tree_map_with_path(spec, params)


def _features(params: dict, x: jax.Array) -> list[jax.Array]:
  h = (x - _SHIFT) / _SCALE
  out = []
  for s, stage in enumerate(STAGES):
    if s:
      h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    for i in stage:
      p = params[f"features_{i}"]
      h = jax.lax.conv_general_dilated(h, p["kernel"], (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      h = jax.nn.relu(h + p["bias"])
    out.append(h)
  return out


def distance(params: dict, x_BxHxWx3: jax.Array, y_BxHxWx3: jax.Array) -> jax.Array:
  """LPIPS-style distance per image, (B, H, W, 3) x2 in [-1, 1] -> (B,).

  H and W must be at least MIN_SIZE (16: four 2x2 pools)."""
  b = x_BxHxWx3.shape[0]
  feats = _features(params, jnp.concatenate([x_BxHxWx3, y_BxHxWx3]).astype(jnp.float32))
  total = jnp.zeros((b,), jnp.float32)
  for k, f in enumerate(feats):
    f = f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + 1e-10)
    d = jnp.square(f[:b] - f[b:])
    d = d @ params[f"lin_{k}"]["kernel"] if f"lin_{k}" in params else jnp.sum(d, axis=-1)
    total = total + jnp.mean(d, axis=(1, 2))
  return total
