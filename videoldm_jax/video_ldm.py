"""The models of a (video) latent diffusion model, built from configs; no parameters.

`VideoLDM` is what stages and samplers need to construct the UNet (with its temporal
layers), the VAE and the text encoder, and to know every parameter's shape and logical
axes without allocating anything. Parameters live in `pretrained.PretrainedLDM` (on disk)
or in the train state.
"""

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from videoldm_jax import pretrained
from videoldm_jax.models import params as params_lib
from videoldm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.unet import UNet, UNetConfig
from videoldm_jax.models.vae import AutoencoderKL, VAEConfig
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_named(name: str, field: str = "train.compute_dtype"):
  """The dtype `DTYPES[name]`; a ValueError naming `field` and the choices otherwise."""
  if name not in DTYPES:
    raise ValueError(f"{field} must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class VideoLDM:
  """Configs of UNet (+ temporal layers), VAE, text encoder and noise schedule."""
  unet_config: UNetConfig
  vae_config: VAEConfig
  text_config: Optional[CLIPTextConfig]
  scheduler: dict = dataclasses.field(hash=False, compare=False, default_factory=dict)
  temporal_config: Optional[TemporalConfig] = None
  compute_dtype: Any = jnp.float32
  remat_policy: str = "none"
  # The class label of a class-conditional UNet's unconditional branch, where it was
  # trained with one (`stages.keyframe.null_class_label`); recorded in its exports.
  null_class_label: Optional[int] = None

  @classmethod
  def from_pretrained(cls, model: pretrained.PretrainedLDM, temporal: Optional[TemporalConfig],
                      compute_dtype: str = "float32", remat_policy: str = "none") -> "VideoLDM":
    dtype = dtype_named(compute_dtype)
    if temporal is not None:
      temporal.validate()
    return cls(model.unet_config, model.vae_config, model.text_config, model.scheduler,
               temporal, dtype, remat_policy)

  def unet(self) -> UNet:
    return UNet(self.unet_config, self.temporal_config, dtype=self.compute_dtype,
                remat_policy=self.remat_policy)

  def vae(self) -> AutoencoderKL:
    return AutoencoderKL(self.vae_config, dtype=self.compute_dtype)

  def text_encoder(self) -> Optional[CLIPTextModel]:
    if self.text_config is None:
      return None
    return CLIPTextModel(self.text_config, dtype=self.compute_dtype)

  def _unet_inputs(self):
    x, t, ctx, labels = unet_lib.example_inputs(
        self.unet_config,
        text=unet_lib.called_with_context(self.unet_config, self.text_config is not None))
    if self.temporal_config is not None:
      x = x[:, None].repeat(2, axis=1)  # two frames: every temporal layer is created
    return x, t, ctx, labels

  def _text_inputs(self):
    return (jnp.zeros((1, self.text_config.max_position_embeddings), jnp.int32),)

  def abstract_params(self) -> dict:
    """{'unet', 'vae'[, 'text_encoder']} of ShapeDtypeStructs."""
    out = {"unet": params_lib.abstract_params(self.unet(), *self._unet_inputs()),
           "vae": params_lib.abstract_params(self.vae(), *vae_lib.example_inputs(self.vae_config))}
    if self.text_config is not None:
      out["text_encoder"] = params_lib.abstract_params(self.text_encoder(), *self._text_inputs())
    return out

  def logical_axes(self) -> dict:
    """The same tree of logical-axis PartitionSpecs."""
    out = {"unet": params_lib.logical_axes(self.unet(), *self._unet_inputs()),
           "vae": params_lib.logical_axes(self.vae(), *vae_lib.example_inputs(self.vae_config))}
    if self.text_config is not None:
      out["text_encoder"] = params_lib.logical_axes(self.text_encoder(), *self._text_inputs())
    return out

  def init_unet_params(self, seed: int, where=None) -> dict:
    """Host-initialised UNet params (optionally only the leaves `where(path)` selects)."""
    return params_lib.init_params(self.unet(), seed, *self._unet_inputs(), where=where)
