"""videoldm-jax: Video Latent Diffusion Models (Blattmann et al. 2023) in JAX/Flax."""

from videoldm_jax import xla_flags as _xla_flags

# Before any backend starts: XLA reads XLA_FLAGS at its first computation.
_xla_flags.apply_defaults()
