"""What the network predicts, and conversions between the three parametrisations.

With x_t = alpha x_0 + sigma eps and alpha^2 + sigma^2 = 1 (variance preserving):
  'epsilon'       the network predicts eps;
  'v_prediction'  it predicts v = alpha eps - sigma x_0 (Salimans & Ho 2022);
  'sample'        it predicts x_0 directly.
All functions take arrays (B, ...) and alpha, sigma either scalars or already broadcastable
against them (e.g. (B, 1, ..., 1)); `schedules.per_example` lifts (B,) coefficients.
"""

import jax

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(kind: str) -> None:
  """Raises ValueError unless kind is one of PREDICTION_TYPES."""
  if kind not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")


def to_x0(pred: jax.Array, x_t: jax.Array, alpha, sigma, kind: str) -> jax.Array:
  """Data prediction x_0 (B, ...) implied by the network output `pred` (B, ...) at x_t."""
  check_prediction_type(kind)
  if kind == "epsilon":
    return (x_t - sigma * pred) / alpha
  if kind == "v_prediction":
    # x_0 = alpha x_t - sigma v, using alpha^2 + sigma^2 = 1.
    return alpha * x_t - sigma * pred
  return pred


def to_eps(pred: jax.Array, x_t: jax.Array, alpha, sigma, kind: str) -> jax.Array:
  """Noise prediction eps (B, ...) implied by the network output `pred` (B, ...) at x_t."""
  check_prediction_type(kind)
  if kind == "epsilon":
    return pred
  if kind == "v_prediction":
    # eps = sigma x_t + alpha v, using alpha^2 + sigma^2 = 1.
    return sigma * x_t + alpha * pred
  return (x_t - alpha * pred) / sigma


def to_v(pred: jax.Array, x_t: jax.Array, alpha, sigma, kind: str) -> jax.Array:
  """Velocity v = alpha eps - sigma x_0 (B, ...) implied by `pred` (B, ...) at x_t."""
  check_prediction_type(kind)
  if kind == "v_prediction":
    return pred
  eps = to_eps(pred, x_t, alpha, sigma, kind)
  return alpha * eps - sigma * to_x0(pred, x_t, alpha, sigma, kind)


def target(kind: str, x0: jax.Array, noise: jax.Array, alpha, sigma) -> jax.Array:
  """Regression target (B, ...) of a network of parametrisation `kind` for the clean
  sample x0 (B, ...) noised with `noise` (B, ...)."""
  check_prediction_type(kind)
  if kind == "epsilon":
    return noise
  if kind == "v_prediction":
    return alpha * noise - sigma * x0
  return x0


def convert(pred: jax.Array, x_t: jax.Array, alpha, sigma, src: str, dst: str) -> jax.Array:
  """Re-expresses a prediction (B, ...) of parametrisation `src` as one of `dst`."""
  check_prediction_type(dst)
  fn = {"epsilon": to_eps, "v_prediction": to_v, "sample": to_x0}[dst]
  return fn(pred, x_t, alpha, sigma, src)
