"""CLIP text encoder (the Stable Diffusion conditioning model) in Flax Linen.

Numerically this is transformers' `CLIPTextModel`: pre-LayerNorm transformer blocks
with causal self-attention, learned absolute position embeddings and a final
LayerNorm. Module names mirror transformers' state-dict names (minus the
`text_model.` prefix) so that `videoldm_jax.convert.clip_keys` maps checkpoints
mechanically:

  embeddings/token_embedding/embedding          <- embeddings.token_embedding.weight
  encoder/layers_0/self_attn/q_proj/kernel      <- encoder.layers.0.self_attn.q_proj.weight
  encoder/layers_0/mlp/fc1/kernel               <- encoder.layers.0.mlp.fc1.weight
  final_layer_norm/scale                        <- final_layer_norm.weight
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models.config_base import JsonConfig
from videoldm_jax.models.layers import dense, embedding, layer_norm

# The activations CLIPMLP runs (both towers).
_ACTIVATIONS = ("quick_gelu", "gelu")
# transformers' `eos_token_id` of CLIP configs written before its PR #24773; such
# configs pool at the argmax of the ids (the EOS id was the largest id in the vocab).
_LEGACY_EOS_ID = 2


def check_tower(config) -> None:
  """Raises ValueError when a CLIP tower's config (text or vision) has an activation
  CLIPMLP does not run or a width its heads do not divide."""
  name = type(config).__name__
  if config.hidden_act not in _ACTIVATIONS:
    raise ValueError(f"{name}.hidden_act={config.hidden_act!r} is not supported; expected "
                     f"one of {_ACTIVATIONS}")
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"{name}.hidden_size={config.hidden_size} is not a multiple of "
                     f"num_attention_heads={config.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(JsonConfig):
  """Hyper-parameters of the CLIP text encoder (defaults: SD 1.x, CLIP ViT-L/14)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # Only used by `pool_eos`; None or 2 selects the legacy argmax pooling.
  eos_token_id: int | None = 49407

  def __post_init__(self):
    check_tower(self)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_transformers_config(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    """Reads a transformers `CLIPTextConfig` config.json dict (e.g. SD's text_encoder/).

    A full `CLIPConfig` dict (model_type "clip") is accepted through its `text_config`.
    Fields that only matter for training or other heads (dropout, initializer,
    projection_dim, bos/pad ids) are ignored.

    Raises:
      ValueError: naming the field, for a model type or value this encoder cannot run.
    """
    if d.get("model_type") == "clip" and "text_config" in d:
      d = d["text_config"]
    model_type = d.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise ValueError(f"config.json field model_type={model_type!r}: expected "
                       f"'clip_text_model' (a transformers CLIPTextModel config)")
    act = d.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
      raise ValueError(f"config.json field hidden_act={act!r} is not supported; expected "
                       f"one of {_ACTIVATIONS}")
    eos = d.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
      if len(eos) != 1:
        raise ValueError(f"config.json field eos_token_id={eos!r}: only a single EOS id "
                         f"is supported")
      eos = eos[0]
    eps = d.get("layer_norm_eps")
    # Missing fields take transformers' CLIPTextConfig defaults, not ours.
    return cls(
        vocab_size=int(d.get("vocab_size", 49408)),
        hidden_size=int(d.get("hidden_size", 512)),
        intermediate_size=int(d.get("intermediate_size", 2048)),
        num_hidden_layers=int(d.get("num_hidden_layers", 12)),
        num_attention_heads=int(d.get("num_attention_heads", 8)),
        max_position_embeddings=int(d.get("max_position_embeddings", 77)),
        hidden_act=act,
        layer_norm_eps=float(eps) if eps is not None else 1e-5,
        eos_token_id=None if eos is None else int(eos))


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  # transformers' "gelu" is the exact erf form, not the tanh approximation.
  return jax.nn.gelu(x, approximate=False)


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention, (B, L, D) -> (B, L, D)."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.config
    b, l, d = x_BxLxD.shape
    h, hd = cfg.num_attention_heads, cfg.head_dim

    def proj(name):
      y = dense(d, ("embed", "heads"), name=name, dtype=self.dtype)(x_BxLxD)
      return y.reshape(b, l, h, hd)

    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = proj("q_proj"), proj("k_proj"), proj("v_proj")
    scores_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK,
                                preferred_element_type=jnp.float32) * (hd ** -0.5)
    causal_LxL = jnp.tril(jnp.ones((l, l), dtype=bool))
    # Masking with the float32 minimum (not -inf) mirrors transformers' additive mask
    # and keeps rows finite.
    scores_BxHxLxL = jnp.where(causal_LxL, scores_BxHxLxL, jnp.finfo(jnp.float32).min)
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1).astype(self.dtype)
    out_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxK)
    out_BxLxD = out_BxLxHxK.reshape(b, l, d)
    return dense(d, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out_BxLxD)


class CLIPMLP(nn.Module):
  """Feed-forward block, (B, L, D) -> (B, L, D)."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.config
    y = dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x_BxLxD)
    y = _activation(cfg.hidden_act, y)
    return dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", dtype=self.dtype)(y)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm transformer block, (B, L, D) -> (B, L, D)."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    eps = self.config.layer_norm_eps
    h = layer_norm(eps, name="layer_norm1", dtype=self.dtype)(x_BxLxD)
    x_BxLxD = x_BxLxD + CLIPAttention(self.config, self.dtype, name="self_attn")(h)
    h = layer_norm(eps, name="layer_norm2", dtype=self.dtype)(x_BxLxD)
    return x_BxLxD + CLIPMLP(self.config, self.dtype, name="mlp")(h)


def check_tokenizer(tokenizer, config: CLIPTextConfig, source: str) -> None:
  """Raises where `tokenizer` (a models.tokenizer.CLIPTokenizer) has ids past `config`'s
  token-embedding table: those rows read as NaN, and causal attention spreads the NaN to
  every later position of the prompt (e.g. a textual-inversion tokenizer beside a text
  encoder without its new rows)."""
  top = max(tokenizer.encoder.values())
  if top >= config.vocab_size:
    name = next(t for t, i in tokenizer.encoder.items() if i == top)
    raise ValueError(f"{source}: the tokenizer has token id {top} ({name!r}) but the text "
                     f"encoder's vocab_size is {config.vocab_size}: use the tokenizer the "
                     "text encoder was trained with")


class CLIPTextEmbeddings(nn.Module):
  """Token + learned position embeddings, (B, L) int -> (B, L, D)."""
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids_BxL: jax.Array) -> jax.Array:
    cfg = self.config
    l = input_ids_BxL.shape[-1]
    if l > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {l} exceeds max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    tok = embedding(cfg.vocab_size, cfg.hidden_size, name="token_embedding")
    pos = embedding(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding")
    return tok(input_ids_BxL) + pos(jnp.arange(l))[None]


class CLIPEncoder(nn.Module):
  """Stack of `num_hidden_layers` blocks named `layers_i` (torch `layers.i`)."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x_BxLxD = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x_BxLxD)
    return x_BxLxD


def pool_eos(hidden_BxLxD: jax.Array, input_ids_BxL: jax.Array,
             eos_token_id: int | None) -> jax.Array:
  """Hidden state at each sequence's EOS token, (B, L, D), (B, L) -> (B, D).

  As transformers: with eos_token_id None or 2 (legacy configs, e.g. SD 1.x/2.x) the
  position is the argmax of the ids (EOS is the largest id in CLIP's vocab); otherwise
  it is the first position whose id equals eos_token_id.
  """
  if eos_token_id is None or eos_token_id == _LEGACY_EOS_ID:
    idx_B = jnp.argmax(input_ids_BxL, axis=-1)
  else:
    idx_B = jnp.argmax((input_ids_BxL == eos_token_id).astype(jnp.int32), axis=-1)
  return jnp.take_along_axis(hidden_BxLxD, idx_B[:, None, None], axis=1)[:, 0]


class CLIPTextModel(nn.Module):
  """CLIP text encoder; `dtype` is the compute dtype (params stay float32).

  `__call__(input_ids_BxL)` returns last_hidden_state (B, L, D) (after
  final_layer_norm), equal to transformers' `CLIPTextModel(...).last_hidden_state`. With
  `return_pooled=True` it returns `(last_hidden_state_BxLxD, pooled_BxD)`, the pooled
  output being `pool_eos` with `config.eos_token_id`. No padding mask is applied: as in
  Stable Diffusion, padding tokens are attended causally like any other token.
  """
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxL: jax.Array, return_pooled: bool = False):
    x_BxLxD = CLIPTextEmbeddings(self.config, name="embeddings")(input_ids_BxL)
    x_BxLxD = CLIPEncoder(self.config, self.dtype, name="encoder")(x_BxLxD.astype(self.dtype))
    x_BxLxD = layer_norm(self.config.layer_norm_eps, name="final_layer_norm",
                         dtype=self.dtype)(x_BxLxD)
    if return_pooled:
      return x_BxLxD, pool_eos(x_BxLxD, input_ids_BxL, self.config.eos_token_id)
    return x_BxLxD
