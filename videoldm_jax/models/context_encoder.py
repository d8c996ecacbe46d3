"""Context frames of the prediction and interpolation models (Video LDM eq. 3).

A model conditioned on S known frames gets c_S = (m_S * z, m_S): the clean latents z
(B, T, h, w, C) masked by a binary per-frame mask m_S (B, T), concatenated with the
mask as one more channel, (B, T, h, w, C+1). The paper feeds c_S to the TEMPORAL layers
through a learned downsampling to every UNet resolution, so theta and the UNet input
conv stay untouched; `ContextEncoder` is that downsampling. It lives in the UNet as
`temporal_context_encoder` (so `partition.is_temporal` counts it as phi) and each
temporal layer adds a zero-initialised projection of the features at its resolution
(`temporal.add_context`).

The encoder has no biases and only activations with f(0) = 0 (SiLU): a cond of all
zeros (S = 0, no frame known) gives features that are exactly zero, so the
unconditional branch of context guidance is exactly the model without context (bit for
bit op by op; two differently fused jitted programs may still round differently).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.models import layers


def masked_cond(latents_BxTxHxWxC: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """c_S = concat(m * z, m): latents (B, T, h, w, C), mask (B, T) in {0, 1} ->
  (B, T, h, w, C+1). Where m = 0 the latent channels are exactly zero."""
  z = latents_BxTxHxWxC
  m = jnp.broadcast_to(mask_BxT.astype(z.dtype)[:, :, None, None, None], z.shape[:-1] + (1,))
  # where(), not m * z: a NaN/inf in a masked-out frame must not leak into the cond.
  return jnp.concatenate([jnp.where(m > 0, z, jnp.zeros_like(z)), m], axis=-1)


def first_frames_mask(num_known_B: jax.Array, num_frames: int) -> jax.Array:
  """Prediction mask: m[b, i] = 1 for the first num_known[b] frames; (B,) -> (B, T) f32."""
  num_known_B = jnp.asarray(num_known_B)
  if num_known_B.ndim != 1:
    # A scalar would broadcast to a mask of the wrong batch (or fail on [:, None]).
    raise ValueError(f"first_frames_mask: num_known has shape {num_known_B.shape}, "
                     "expected (B,): one count per video")
  return (jnp.arange(num_frames)[None, :] < num_known_B[:, None]).astype(jnp.float32)


def strided_mask(batch: int, num_frames: int, stride: int = 4) -> jax.Array:
  """Interpolation mask: m[b, i] = 1 at frames 0, stride, 2 stride, ...; (B, T) f32."""
  if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
    raise ValueError(f"strided_mask: stride {stride!r}, expected a whole number >= 1")
  m = (jnp.arange(num_frames) % stride == 0).astype(jnp.float32)
  return jnp.broadcast_to(m[None], (batch, num_frames))


class ContextEncoder(nn.Module):
  """Per-frame, bias-free conv encoder of c_S to one feature map per UNet level.

  (N, h, w, C+1) -> tuple of (N, h / 2^l, w / 2^l, channels[l]) for l = 0..L-1, as the
  UNet's levels (its downsamplers are stride-2 3x3 convs with padding 1, and so are
  these, so the sizes match for odd sizes too). Level 0: conv3x3-SiLU-conv3x3; every
  further level: SiLU-stride-2 conv3x3-SiLU-conv3x3 on the previous level's output.
  Frames are encoded independently: mixing over time is the temporal layers' job.
  """
  channels: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, cond_NxHxWxC: jax.Array) -> tuple[jax.Array, ...]:
    conv = lambda c, name, stride=1: layers.conv2d(c, 3, stride, name=name, dtype=self.dtype,
                                                   use_bias=False)
    h = nn.silu(conv(self.channels[0], "conv_in")(cond_NxHxWxC.astype(self.dtype)))
    h = conv(self.channels[0], "conv_0")(h)
    features = [h]
    for level, c in enumerate(self.channels[1:], start=1):
      h = nn.silu(conv(c, f"down_{level}", stride=2)(nn.silu(h)))
      h = conv(c, f"conv_{level}")(h)
      features.append(h)
    return tuple(features)
