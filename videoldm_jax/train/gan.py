"""Adversarial losses of autoencoder training (taming-transformers / SD's KL autoencoder,
and Video LDM's temporal decoder fine-tuning).

  D loss       hinge: 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))
  G loss       -mean(D(x_rec))
  adaptive     lambda = ||d L_rec / d W_last|| / (||d L_G / d W_last|| + 1e-4), clipped to
  weight       [0, 1e4], no gradient, times a config factor; W_last is the decoder's
               last layer, so the GAN term is scaled to pull about as hard as the
               reconstruction term where it matters most
  start        both adversarial terms are multiplied by 0 before `disc_start` steps
               (the autoencoder first learns to reconstruct; D then gets no gradient,
               and no update: see optim.hold_until)

The train step takes one gradient of the SUM of the generator's loss (discriminator
parameters stop-gradiented) and the discriminator's (reconstructions stop-gradiented):
each network gets exactly its own gradient (see train/step.py `Stage.group`).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

MAX_WEIGHT = 1e4


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Hinge loss of the discriminator; logits of any (equal or not) shapes -> scalar."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) +
                jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """-mean(D(x_rec)): the generator's adversarial loss (hinge GAN), any shape -> scalar."""
  return -jnp.mean(logits_fake)


def disc_factor(step: jax.Array, disc_start: int, factor: float = 1.0) -> jax.Array:
  """`factor` from step `disc_start` on, 0 before (scalar float32)."""
  return jnp.where(jnp.asarray(step) >= disc_start, jnp.float32(factor), jnp.float32(0.0))


def adaptive_weight(grad_rec, grad_gan, factor: float = 1.0) -> jax.Array:
  """lambda = ||grad_rec|| / (||grad_gan|| + 1e-4), clipped to [0, 1e4], without gradient,
  times `factor`. grad_* are the gradients (arrays or pytrees) of the reconstruction
  and generator losses w.r.t. the decoder's last-layer weight."""
  w = optax.tree.norm(grad_rec) / (optax.tree.norm(grad_gan) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, MAX_WEIGHT)) * factor


def last_layer_weight(head: Callable[[jax.Array], jax.Array], weight: jax.Array,
                      losses: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                      factor: float = 1.0) -> jax.Array:
  """The adaptive weight from the last layer's gradients, computed without gradient.

  head(weight) -> reconstruction, the decoder's last layer applied to (stop-gradiented)
  features with this kernel; losses(reconstruction) -> (L_rec, L_G). One forward and
  two pullbacks give both gradients w.r.t. `weight`. Pass closures over
  stop-gradiented values only (features, other parameters, discriminator): then no
  derivative of this computation is ever traced by the outer gradient.
  """
  weight = jax.lax.stop_gradient(weight)
  _, pullback = jax.vjp(lambda w: losses(head(w)), weight)
  one, zero = jnp.float32(1.0), jnp.float32(0.0)
  (g_rec,) = pullback((one, zero))
  (g_gan,) = pullback((zero, one))
  return adaptive_weight(g_rec, g_gan, factor)
