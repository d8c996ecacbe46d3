"""CLIP similarity (CLIPSIM) of video frames and their prompts.

CLIPSIM of a video = the mean over its frames of cos(image embedding of the frame,
text embedding of its prompt); the metric is the mean over videos. Raw cosines are
reported (many papers print 100 x cosine; some clamp at 0 as torchmetrics' CLIPScore).

The CLIP model is a local transformers `CLIPModel` folder (config.json,
model.safetensors, tokenizer files in the folder or its tokenizer/ subfolder,
optionally preprocessor_config.json). The text tower is `models.clip_text`; this file
adds the vision tower (ViT: class token, patch conv, learned positions, pre-LayerNorm
blocks with full attention, post-LayerNorm on the class token) and the two bias-free
projections, named after transformers' modules so the state dict maps mechanically:

  vision_model/embeddings/patch_embedding/kernel <- vision_model.embeddings.patch_embedding.weight
  vision_model/pre_layrnorm/scale                <- vision_model.pre_layrnorm.weight (sic)
  visual_projection/kernel, text_projection/kernel <- visual_projection.weight, ...

Image preprocessing follows CLIPImageProcessor's recipe on the device: bicubic resize
of the shortest side to `size` (jax.image.resize 'bicubic' with antialias, close to but
not bit-equal with PIL's), center crop, normalisation by image_mean / image_std.
"""

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.convert.safetensors_io import find_weights, load_safetensors
from videoldm_jax.convert.torch_layout import flax_path_to_torch_key, load_state_dict
from videoldm_jax.eval.batching import BatchedApply
from videoldm_jax.eval.layers import check_float_range, check_pixels
from videoldm_jax.models.clip_text import (CLIPMLP, CLIPTextConfig, CLIPTextModel,
                                          check_tokenizer, check_tower)
from videoldm_jax.models.config_base import JsonConfig
from videoldm_jax.models.layers import dense, embedding, layer_norm, param_init, Init
from videoldm_jax.models.tokenizer import CLIPTokenizer

# OpenAI CLIP's normalisation (CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Buffers and the contrastive temperature: not used by the embeddings.
_IGNORED = (r"position_ids$", r"^logit_scale$")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(JsonConfig):
  """Hyper-parameters of CLIP's vision tower (defaults: transformers', ViT-B/32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    check_tower(self)  # (any other activation ran as exact gelu, shifting CLIPSIM)

  @classmethod
  def from_transformers_config(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
    """From a CLIPModel config.json (through its vision_config) or a CLIPVisionConfig."""
    if d.get("model_type") == "clip" or "vision_config" in d:
      d = d.get("vision_config") or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields and v is not None})


class CLIPVisionAttention(nn.Module):
  """Multi-head self-attention over all tokens, (B, L, D) -> (B, L, D)."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.config
    b, l, d = x_BxLxD.shape
    h = cfg.num_attention_heads
    proj = lambda name: dense(d, ("embed", "heads"), name=name)(x_BxLxD).reshape(  # noqa
        b, l, h, d // h)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = proj("q_proj"), proj("k_proj"), proj("v_proj")
    scores_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK) * (d // h) ** -0.5
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
    out_BxLxD = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxK).reshape(b, l, d)
    return dense(d, ("heads", "embed"), name="out_proj")(out_BxLxD)


class CLIPVisionLayer(nn.Module):
  """Pre-LayerNorm transformer block (full attention), (B, L, D) -> (B, L, D)."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    eps = self.config.layer_norm_eps
    x_BxLxD = x_BxLxD + CLIPVisionAttention(self.config, name="self_attn")(
        layer_norm(eps, name="layer_norm1")(x_BxLxD))
    # CLIPMLP reads only hidden_size / intermediate_size / hidden_act, shared by both towers.
    return x_BxLxD + CLIPMLP(self.config, name="mlp")(layer_norm(eps, name="layer_norm2")(x_BxLxD))


class CLIPVisionEncoder(nn.Module):
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x_BxLxD = CLIPVisionLayer(self.config, name=f"layers_{i}")(x_BxLxD)
    return x_BxLxD


class CLIPVisionEmbeddings(nn.Module):
  """(B, S, S, 3) normalised pixels -> (B, 1 + (S / patch)^2, D) tokens."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels_BxSxSx3: jax.Array) -> jax.Array:
    cfg = self.config
    b, s, s2, _ = pixels_BxSxSx3.shape
    if (s, s2) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"CLIP vision input must be {cfg.image_size}x{cfg.image_size}, "
                       f"got {s}x{s2}")
    p, d = cfg.patch_size, cfg.hidden_size
    patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      kernel_init=param_init(Init("fan_in_normal"),
                                             ("conv_kh", "conv_kw", "conv_in", "conv_out")),
                      name="patch_embedding")(pixels_BxSxSx3)
    patches_BxNxD = patches.reshape(b, -1, d)  # row-major grid, as torch's flatten(2)
    cls = self.param("class_embedding", param_init(Init("normal", 0.02), ("embed",)), (d,))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), patches_BxNxD], axis=1)
    pos = embedding(tokens.shape[1], d, name="position_embedding")
    return tokens + pos(jnp.arange(tokens.shape[1]))[None]


class CLIPVisionTransformer(nn.Module):
  """(B, S, S, 3) -> pooled (B, D): post_layernorm of the class token's final state."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels_BxSxSx3: jax.Array) -> jax.Array:
    eps = self.config.layer_norm_eps
    x = CLIPVisionEmbeddings(self.config, name="embeddings")(pixels_BxSxSx3)
    x = layer_norm(eps, name="pre_layrnorm")(x)  # transformers' spelling
    x = CLIPVisionEncoder(self.config, name="encoder")(x)
    return layer_norm(eps, name="post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
  """Both towers and projections; `encode_image` / `encode_text` give (B, projection_dim)
  embeddings equal to transformers' get_image_features / get_text_features (not
  normalised)."""
  text_config: CLIPTextConfig
  vision_config: CLIPVisionConfig
  projection_dim: int = 512

  def setup(self):
    self.text_model = CLIPTextModel(self.text_config)
    self.vision_model = CLIPVisionTransformer(self.vision_config)
    self.visual_projection = dense(self.projection_dim, ("embed", "mlp"), use_bias=False,
                                   name="visual_projection")
    self.text_projection = dense(self.projection_dim, ("embed", "mlp"), use_bias=False,
                                 name="text_projection")

  def encode_image(self, pixels_BxSxSx3: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixels_BxSxSx3))

  def encode_text(self, input_ids_BxL: jax.Array) -> jax.Array:
    _, pooled_BxD = self.text_model(input_ids_BxL, return_pooled=True)
    return self.text_projection(pooled_BxD)

  def __call__(self, pixels_BxSxSx3, input_ids_BxL):
    return self.encode_image(pixels_BxSxSx3), self.encode_text(input_ids_BxL)


def _torch_key(path: tuple[str, ...]) -> str:
  if path[-1] == "class_embedding":  # a bare nn.Parameter, no .weight
    return ".".join(path)
  return flax_path_to_torch_key(path)


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
  """CLIPImageProcessor settings: resize shortest side, center crop, normalise."""
  resize: int = 224
  crop: int = 224
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD

  @classmethod
  def from_folder(cls, folder: Path, image_size: int) -> "ImagePreprocess":
    """The folder's preprocessor_config.json (else `image_size` for both sizes); raises
    ValueError for a setting not implemented here or a crop other than `image_size`, the
    vision tower's input size."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
      return cls(image_size, image_size)
    d = json.loads(path.read_text())
    # Only CLIPImageProcessor's own pipeline is implemented (bicubic resize of the
    # shortest side, square centre crop, /255, normalise); another setting was read as
    # these defaults before, and every similarity shifted without a word.
    fixed = {"do_resize": True, "do_center_crop": True, "do_rescale": True,
             "do_normalize": True, "resample": 3}
    wrong = [f"{k}={d[k]!r} (expected {v!r})" for k, v in fixed.items()
             if k in d and d[k] != v]
    if "rescale_factor" in d and not math.isclose(d["rescale_factor"], 1 / 255):
      wrong.append(f"rescale_factor={d['rescale_factor']!r} (expected 1/255)")
    size, crop = d.get("size", image_size), d.get("crop_size", image_size)
    if isinstance(size, dict):
      if set(size) != {"shortest_edge"}:
        wrong.append(f"size={size!r} (expected {{'shortest_edge': N}})")
      size = size.get("shortest_edge", image_size)
    if isinstance(crop, dict):
      if crop.get("height") != crop.get("width"):
        wrong.append(f"crop_size={crop!r} (expected a square)")
      crop = crop.get("height", image_size)
    if not wrong and not (isinstance(size, int) and isinstance(crop, int)
                          and 0 < crop <= size):
      wrong.append(f"size {size!r} and crop_size {crop!r} (expected 0 < crop <= size)")
    for name, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
      value = d.get(name, default)  # (another length failed at the first frames' broadcast)
      if not (isinstance(value, (list, tuple)) and len(value) == 3
              and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) for v in value)
              and (name == "image_mean" or all(v > 0 for v in value))):
        wrong.append(f"{name}={value!r} (expected three numbers, one per RGB channel"
                     + (", each > 0)" if name == "image_std" else ")"))
    if wrong:
      raise ValueError(f"{path}: preprocessing this evaluator does not implement: "
                       + "; ".join(wrong))
    if crop != image_size:  # (else an error at the first frames through the tower)
      raise ValueError(f"{path}: crop_size {crop} but the vision tower's image_size is "
                       f"{image_size} (config.json): the preprocessor is not this model's")
    return cls(size, crop, tuple(d.get("image_mean", CLIP_MEAN)),
               tuple(d.get("image_std", CLIP_STD)))

  def __call__(self, frames_BxHxWx3: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] frames (B, H, W, 3) -> (B, crop, crop, 3)."""
    x = frames_BxHxWx3
    check_pixels(x)
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else (x + 1.0) / 2.0
    b, h, w, _ = x.shape
    if h <= w:
      nh, nw = self.resize, int(self.resize * w / h)
    else:
      nh, nw = int(self.resize * h / w), self.resize
    if (nh, nw) != (h, w):
      x = jax.image.resize(x, (b, nh, nw, 3), "bicubic", antialias=True)
    top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
    x = x[:, top:top + self.crop, left:left + self.crop]
    return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)


def _read_configs(folder: Path) -> tuple[CLIPModel, ImagePreprocess]:
  """The (unbound) CLIP model and image preprocessing a transformers folder's config
  files describe; no weights are read."""
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(f"{folder}: no config.json (expected a transformers CLIPModel "
                            "folder, as written by CLIPModel.save_pretrained)")
  cfg = json.loads((folder / "config.json").read_text())
  if cfg.get("model_type") != "clip":
    raise ValueError(f"{folder}/config.json: model_type={cfg.get('model_type')!r}, expected "
                     "'clip' (a full CLIPModel with both towers)")
  model = CLIPModel(CLIPTextConfig.from_transformers_config(cfg),
                    CLIPVisionConfig.from_transformers_config(cfg),
                    int(cfg.get("projection_dim", 512)))
  return model, ImagePreprocess.from_folder(folder, model.vision_config.image_size)


def check_folder(folder: str | os.PathLike) -> CLIPTokenizer:
  """Raises what `CLIPSimilarity(folder)` would for the folder's config and tokenizer
  files (config.json, preprocessing that fits the vision tower, a tokenizer within the
  text tower's vocabulary) without reading the weights: videoldm-eval calls it before
  any network loads. Returns the tokenizer, for `CLIPSimilarity(..., tokenizer=)`."""
  model, _ = _read_configs(Path(folder))
  tokenizer = load_tokenizer(folder)
  check_tokenizer(tokenizer, model.text_config, str(folder))
  return tokenizer


def load_clip(folder: str | os.PathLike) -> tuple[CLIPModel, dict, ImagePreprocess]:
  """CLIP model, float32 numpy params and image preprocessing from a transformers folder.

  Raises:
    FileNotFoundError: missing folder, config.json or weights (pickle-only folders are
      refused with conversion instructions).
    ValueError: a config or preprocessor_config.json this evaluator cannot run, before
      the weights are read.
    ConversionError: listing every missing, mis-shaped or unused key.
  """
  folder = Path(folder)
  model, preprocess = _read_configs(folder)
  v = model.vision_config
  abstract = nn.unbox(jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, v.image_size, v.image_size, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, model.text_config.max_position_embeddings), jnp.int32)))
  weights = find_weights(folder, "model")
  params = load_state_dict(abstract["params"], load_safetensors(weights), what="CLIP",
                           source=str(weights), key_fn=_torch_key, ignore=_IGNORED)
  return model, params, preprocess


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
  """The CLIP tokenizer of a CLIPModel folder (its own files or its tokenizer/)."""
  folder = Path(folder)
  for candidate in (folder, folder / "tokenizer"):
    if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.json").is_file():
      return CLIPTokenizer.from_folder(str(candidate))
  raise FileNotFoundError(f"{folder}: no CLIP tokenizer (tokenizer.json or vocab.json + "
                          "merges.txt) in the folder or its tokenizer/ subfolder")


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def _embedding_fns(text_config: CLIPTextConfig, vision_config: CLIPVisionConfig,
                   projection_dim: int, preprocess: ImagePreprocess):
  """(params, frames) and (params, ids) -> unit-norm embeddings, one pair per setting."""
  model = CLIPModel(text_config, vision_config, projection_dim)

  def images(params, frames):
    return _normalize(model.apply({"params": params}, preprocess(frames),
                                  method=CLIPModel.encode_image))

  def texts(params, ids):
    return _normalize(model.apply({"params": params}, ids, method=CLIPModel.encode_text))

  return images, texts


class CLIPSimilarity:
  """Unit-norm CLIP embeddings of frames and texts, and CLIPSIM of videos."""

  def __init__(self, folder: str | os.PathLike, batch_size: int = 64,
               devices: Sequence[jax.Device] | None = None,
               tokenizer: CLIPTokenizer | None = None, text_batch_size: int | None = None):
    """batch_size: frames per image step; text_batch_size: prompts per text step
    (default batch_size): `video_scores` embeds one prompt per clip, T frames each, so
    texts padded to the frame batch ran the text tower T times over.
    tokenizer: the folder's, when the caller has read it already (`check_folder`)."""
    self.model, params, self.preprocess = load_clip(folder)
    self.tokenizer = tokenizer or load_tokenizer(folder)
    check_tokenizer(self.tokenizer, self.model.text_config, str(folder))
    image_fn, text_fn = _embedding_fns(self.model.text_config, self.model.vision_config,
                                       self.model.projection_dim, self.preprocess)
    self._images = BatchedApply(image_fn, params, batch_size, devices)
    # Reuses the replicated params already on the devices (device_put is then a no-op).
    self._texts = BatchedApply(text_fn, self._images.variables, text_batch_size or batch_size,
                               devices)

  def image_embeddings(self, frames_NxHxWx3: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 or [-1, 1] float frames -> (N, P) unit-norm embeddings."""
    check_float_range(frames_NxHxWx3)
    return self._images(frames_NxHxWx3)

  def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
    """M texts -> (M, P) unit-norm embeddings (CLIP tokenizer, max length 77)."""
    ids = self.tokenizer(list(texts),
                         max_length=min(self.tokenizer.model_max_length,
                                        self.model.text_config.max_position_embeddings))
    return self._texts(ids)

  def video_scores(self, videos_NxTxHxWx3: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """(N,) CLIPSIM per video: frame-text cosines averaged over the T frames."""
    n, t = videos_NxTxHxWx3.shape[:2]
    if len(prompts) != n:
      raise ValueError(f"{n} videos but {len(prompts)} prompts")
    frames = self.image_embeddings(videos_NxTxHxWx3.reshape(n * t, *videos_NxTxHxWx3.shape[2:]))
    text_NxP = self.text_embeddings(prompts)
    cos_NxT = np.einsum("ntp,np->nt", frames.reshape(n, t, -1).astype(np.float64),
                        text_NxP.astype(np.float64))
    return cos_NxT.mean(axis=1)
