"""Layers computed in a faster form than their definition equal the definition.

`UpsampleConv` (four 2x2 phase convs) against a 3x3 conv of the nearest-2x-upsampled
input, `GEGLU` (two kernel halves, erf GELU, a hand-written backward) against one dense
layer split in two with `jax.nn.gelu`, `GroupNorm` (two-stage sums, a hand-written
backward) against `nn.GroupNorm`, `LayerNorm` (a hand-written backward) against
`nn.LayerNorm`, and `TimeOnlyConv` (a (kt, 1, 1) conv as one
matmul of time-shifted inputs) against `nn.Conv`: same parameters, values and gradients
to float32 rounding, with every parameter perturbed away from its initialisation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videoldm_jax.models import attention, layers
from videoldm_jax.models.attention import GEGLU
from videoldm_jax.models.temporal import TimeOnlyConv, conv3d
from videoldm_jax.train.flops import model_flops


def _perturbed(params, seed=1):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _assert_same_function(fast, reference, x, params, tol=1e-5):
  """fast(params, x) == reference(params, x) in value, d/dx and d/dparams."""
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) ** 2)
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  assert rel(jax.jit(fast)(params, x), jax.jit(reference)(params, x)) < tol
  for argnum in (0, 1):
    got = jax.jit(jax.grad(loss(fast), argnums=argnum))(params, x)
    want = jax.jit(jax.grad(loss(reference), argnums=argnum))(params, x)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      assert g.shape == w.shape and rel(g, w) < tol


class _ReferenceUpsample(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv2d(self.features, 3, name="conv")(x)


@pytest.mark.parametrize("shape, features", [((2, 5, 7, 4), 6), ((1, 8, 8, 16), 16)])
def test_upsample_conv_is_a_conv_of_the_nearest_upsampled_input(shape, features):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
  fast = layers.UpsampleConv(features, name="conv")
  reference = _ReferenceUpsample(features)
  params = nn.unbox(reference.init(jax.random.key(0), x))
  # Same parameter tree (paths and shapes): checkpoints load into either.
  assert (jax.tree_util.tree_map(jnp.shape, nn.unbox(fast.init(jax.random.key(0), x)))
          == jax.tree_util.tree_map(jnp.shape, {"params": params["params"]["conv"]}))
  params = _perturbed(params)
  _assert_same_function(lambda p, x: fast.apply({"params": p["params"]["conv"]}, x),
                        reference.apply, x, params)
  # 16 of the reference's 36 multiply-adds per input pixel and output channel: forward
  # 2 x (B H W) x 16 x C x F.
  b, h, w, c = shape
  forward = lambda m, p: model_flops(lambda p: m.apply(p, x), p)
  assert forward(fast, {"params": params["params"]["conv"]}) == 2 * b * h * w * 16 * c * features
  assert forward(reference, params) == 2 * b * (2 * h) * (2 * w) * 9 * c * features


class _ReferenceGEGLU(nn.Module):
  inner: int

  @nn.compact
  def __call__(self, x):
    h, gate = jnp.split(layers.dense(2 * self.inner, name="proj")(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


def test_geglu_halves_and_erf_gelu_equal_one_split_dense_layer():
  x = jnp.asarray(3 * np.random.default_rng(0).standard_normal((2, 9, 8), np.float32))
  reference = _ReferenceGEGLU(12)
  params = _perturbed(nn.unbox(reference.init(jax.random.key(0), x)))
  fast = GEGLU(12)
  assert (jax.tree_util.tree_map(jnp.shape, nn.unbox(fast.init(jax.random.key(0), x)))
          == jax.tree_util.tree_map(jnp.shape, params))
  _assert_same_function(fast.apply, reference.apply, x, params)


@pytest.mark.parametrize("shape", [(3, 5, 4, 16), (2, 3, 4, 5, 16), (4, 16)])
def test_group_norm_equals_flax_group_norm(shape):
  x = jnp.asarray(2 + 3 * np.random.default_rng(0).standard_normal(shape, np.float32))
  fast = layers.group_norm(4, 1e-5, name="norm")
  reference = nn.GroupNorm(num_groups=4, epsilon=1e-5, param_dtype=jnp.float32)
  params = _perturbed(nn.unbox(fast.init(jax.random.key(0), x)))
  assert (jax.tree_util.tree_map(jnp.shape, nn.unbox(reference.init(jax.random.key(0), x)))
          == jax.tree_util.tree_map(jnp.shape, params))
  _assert_same_function(fast.apply, reference.apply, x, params)


@pytest.mark.parametrize("shape", [(3, 5, 4, 16), (2, 9, 48), (4, 8)])
def test_layer_norm_equals_flax_layer_norm(shape):
  x = jnp.asarray(2 + 3 * np.random.default_rng(0).standard_normal(shape, np.float32))
  fast = layers.layer_norm(1e-5, name="norm")
  reference = nn.LayerNorm(epsilon=1e-5, param_dtype=jnp.float32)
  params = _perturbed(nn.unbox(fast.init(jax.random.key(0), x)))
  assert (jax.tree_util.tree_map(jnp.shape, nn.unbox(reference.init(jax.random.key(0), x)))
          == jax.tree_util.tree_map(jnp.shape, params))
  _assert_same_function(fast.apply, reference.apply, x, params)


def test_group_norm_names_groups_that_do_not_divide_the_channels():
  with pytest.raises(ValueError, match=r"GroupNorm norm: 3 groups do not divide the 16 "
                                       r"channels of an input of shape \(2, 4, 16\)"):
    layers.group_norm(3, 1e-5, name="norm").init(jax.random.key(0), jnp.ones((2, 4, 16)))


def test_gated_gelu_keeps_only_its_two_inputs_for_the_backward():
  rng = np.random.default_rng(1)
  h, gate = (jnp.asarray(3 * rng.standard_normal((64, 48), np.float32)) for _ in range(2))
  saved = lambda f: [a for a in jax.tree_util.tree_leaves(jax.vjp(f, h, gate)[1])
                     if a.shape == h.shape]
  assert len(saved(attention.gated_gelu)) == 2
  # Autodiff of the same product keeps more full-size arrays (erf, partial products).
  assert len(saved(lambda h, gate: h * attention.gelu(gate))) > 2


@pytest.mark.parametrize("kernel", [(3, 1, 1), (5, 1, 1)])
def test_time_only_conv_equals_a_3d_conv(kernel):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 3, 4, 5), np.float32))
  fast = conv3d(7, kernel, name="conv")
  try:  # what conv3d builds when compiling for an accelerator
    attention.set_implementation("auto", platform="tpu")
    reference = conv3d(7, kernel, name="conv")
  finally:
    attention.set_implementation("auto")
  assert isinstance(fast, TimeOnlyConv) and isinstance(reference, nn.Conv)
  # Same parameter tree and the same initial values: checkpoints load into either.
  init = lambda m: nn.unbox(m.init(jax.random.key(0), x))
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)), init(fast), init(reference)))
  _assert_same_function(fast.apply, reference.apply, x, _perturbed(init(reference)))


def test_fusion_boundary_is_an_identity_that_stays_in_the_compiled_program():
  x = jnp.array([1.0000001, np.nan, np.inf, -np.inf, 1e-45, 3.4e38, -0.0], jnp.float32)
  for v in (x, x.astype(jnp.bfloat16)):
    out = jax.jit(layers.fusion_boundary)(v)
    bits = lambda a: np.asarray(a).view(np.uint32 if a.dtype == jnp.float32 else np.uint16)
    assert np.array_equal(bits(v), bits(out))
  # Not simplified away (as an optimisation barrier is): it is what keeps LayerNorm's
  # backward apart from the dots before it.
  hlo = jax.jit(lambda v: jnp.exp(layers.fusion_boundary(v * 2.0))).lower(x).compile().as_text()
  assert "reduce-precision" in hlo
