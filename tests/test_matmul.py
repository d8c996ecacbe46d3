"""models/matmul.py: dense layers' matmul with the weight gradient from the C++ kernel
(tests/test_native_matmul.py) or, where it does not apply, as (x^T materialised) @ dy,
or summed over row chunks. Same values and gradients as `x @ W` on every path; no
weight gradient for a frozen kernel; on XLA:CPU the compiled weight gradient is a
canonical dot (no token-axis contraction left for Eigen); other target platforms get
`lax.dot_general` untouched."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videoldm_jax.models import attention, layers, matmul
from videoldm_jax.models.matmul import dense_dot_general, dense_matmul, dense_matmul_chunked


@pytest.fixture
def xla_weight_grad(monkeypatch):
  """The XLA forms of the weight gradient, not the C++ kernel that takes float32."""
  monkeypatch.setattr(matmul, "USE_KERNEL", False)


def _xw(seed=0, shape=(2, 48, 24), features=40):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(shape, np.float32)),
          jnp.asarray(rng.standard_normal((shape[-1], features), np.float32)))


# (2, 512, 1024): 1024 rows of width 1024 are 4 chunks of 256 rows in the chunked form.
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("fn,shape", [(dense_matmul, (2, 48, 24)),
                                      (dense_matmul_chunked, (2, 48, 24)),
                                      (dense_matmul_chunked, (2, 512, 1024))])
def test_values_and_gradients_match_the_plain_matmul(fn, shape, use_kernel, monkeypatch):
  monkeypatch.setattr(matmul, "USE_KERNEL", use_kernel)
  # 48 features: a width the C++ weight gradient takes (a multiple of 16), so the
  # use_kernel cases run it (where it is built) rather than XLA's form.
  x, w = _xw(shape=shape, features=48)
  probe = jnp.asarray(np.random.default_rng(1).standard_normal(shape[:-1] + (48,),
                                                                np.float32))
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * probe)
  from videoldm_jax.models import native_matmul
  traced = str(jax.make_jaxpr(jax.grad(loss(fn), argnums=1))(x, w))
  assert ("videoldm_weight_grad" in traced) == (use_kernel and native_matmul.available())
  ours = jax.jit(jax.value_and_grad(loss(fn), argnums=(0, 1)))(x, w)
  ref = jax.jit(jax.value_and_grad(loss(lambda x, w: x @ w), argnums=(0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    # Sums over 1024 products in another order: ~1e-6 relative in float32.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("fn", [dense_matmul, dense_matmul_chunked])
@pytest.mark.parametrize("features_in,features_out", [(5, 0), (0, 5)])
def test_a_layer_of_zero_features_has_empty_gradients(fn, features_in, features_out):
  # (The weight gradient reshaped dy to (-1, 0): a ZeroDivisionError.)
  x, w = jnp.ones((2, 3, features_in)), jnp.ones((features_in, features_out))
  dx, dw = jax.grad(lambda x, w: jnp.sum(fn(x, w)), argnums=(0, 1))(x, w)
  assert dx.shape == x.shape and dw.shape == w.shape


def test_chunked_weight_gradient_in_bfloat16():
  x, w = _xw(shape=(2, 512, 1024))
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  grad = lambda f, x, w: jax.jit(jax.grad(lambda w: jnp.sum(f(x, w).astype(jnp.float32))))(w)
  ours = grad(dense_matmul_chunked, x16, w16)
  ref = grad(lambda x, w: x @ w, x16.astype(jnp.float32), w16.astype(jnp.float32))
  assert ours.dtype == jnp.bfloat16
  # dW = column sums of x over 1024 rows: float32 sums of the 4 chunks, each rounded
  # once to bfloat16 (2^-8 relative), then the result once more.
  # (A bfloat16 accumulator errs by up to ~0.46 here, float32 sums by ~0.25.)
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref),
                             rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("fn", [dense_matmul, dense_matmul_chunked])
def test_input_gradient_keeps_the_inputs_dtype(fn):
  # bfloat16 x times a float32 kernel: dx came back float32 (x @ w gives bfloat16).
  x, w = _xw(shape=(2, 48, 24))
  dx, dw = jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) ** 2),
                    argnums=(0, 1))(x.astype(jnp.bfloat16), w)
  ref = jax.grad(lambda x, w: jnp.sum((x @ w).astype(jnp.float32) ** 2),
                 argnums=(0, 1))(x.astype(jnp.bfloat16), w)
  assert (dx.dtype, dw.dtype) == (ref[0].dtype, ref[1].dtype) == (jnp.bfloat16, jnp.float32)


def test_chunk_rows():
  # 256K elements per chunk: 256K / 512 = 512 rows; 256K / 1024 = 256 rows.
  assert matmul.chunk_rows(8192, 512) == 512
  assert matmul.chunk_rows(2048, 1024) == 256
  assert matmul.chunk_rows(16384, 256) == 1024
  # No divisor of 1000 in [256, 256]: one chunk rather than thin ones (250 rows).
  assert matmul.chunk_rows(1000, 1024) == 1000
  assert matmul.chunk_rows(100, 8) == 100  # fits in one chunk


def test_chunked_weight_gradient_loops_over_canonical_dots(xla_weight_grad):
  x, w = _xw(shape=(2, 512, 1024), features=64)
  hlo = jax.jit(jax.grad(lambda w: jnp.sum(dense_matmul_chunked(x, w) ** 2))
                ).lower(w).compile().as_text()
  assert " while(" in hlo  # the loop over the 4 chunks
  assert not re.search(r"lhs_contracting_dims=\{0\}", hlo)


def test_feed_forward_out_projection_is_chunked(xla_weight_grad):
  # GEGLU's product feeds net_2: with 2048 tokens of inner width 256 (4 x 64), its dW
  # is 2 chunks of 1024 rows; net_0's input (width 64) keeps the transposed form.
  ff = attention.FeedForward()
  x = jnp.ones((2, 1024, 64))
  params = ff.init(jax.random.key(0), x)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(ff.apply(p, x))))(params))
  assert jaxpr.count("scan[") == 1


def _dots(closed_jaxpr) -> int:
  """Matmuls in a jaxpr: dot_generals and the C++ weight gradient's calls."""
  text = str(closed_jaxpr)  # nested jaxprs print inline
  return text.count("dot_general[") + text.count("videoldm_weight_grad")


def test_frozen_kernel_gets_no_weight_gradient():
  x, w = _xw()
  # Differentiating x only (W closed over, as the frozen image model is): the forward
  # dot and dx = dy W^T, nothing else. Differentiating W as well adds dW.
  grad_x = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(dense_matmul(x, w))))(x)
  grad_xw = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(dense_matmul(x, w)),
                                    argnums=(0, 1)))(x, w)
  assert _dots(grad_x) == 2
  assert _dots(grad_xw) == 3


def test_cpu_weight_gradient_is_a_canonical_dot(xla_weight_grad):
  x, w = _xw(shape=(4, 256, 64), features=128)
  grad_w = jax.jit(jax.grad(lambda w: jnp.sum(dense_matmul(x, w) ** 2)))
  hlo = grad_w.lower(w).compile().as_text()
  # The plain x @ W's dW contracts the token axis (dim 0 of the flattened x); here the
  # transpose is materialised, so no dot of the module contracts an lhs dim 0.
  plain = jax.jit(jax.grad(lambda w: jnp.sum((x @ w) ** 2))).lower(w).compile().as_text()
  token_contraction = re.compile(r"lhs_contracting_dims=\{0\}")
  assert token_contraction.search(plain), "XLA changed: the plain dW no longer contracts dim 0"
  assert not token_contraction.search(hlo)


def test_dense_layers_use_it_on_cpu_only():
  module = layers.dense(8, name="proj")
  x = jnp.ones((3, 5, 4))
  params = module.init(jax.random.key(0), x)
  jaxpr = lambda: str(jax.make_jaxpr(lambda p: module.apply(p, x))(params))
  assert "custom_vjp_call" in jaxpr()
  try:
    attention.set_implementation("auto", platform="tpu")
    assert "custom_vjp_call" not in jaxpr()
  finally:
    attention.set_implementation("auto")


@pytest.mark.parametrize("x_shape,w_shape,dims", [
    ((3, 6), (5, 6), (((1,), (1,)), ((), ()))),           # x W^T: not a dense layer's
    ((3, 4, 5), (3, 5, 6), (((2,), (1,)), ((0,), (0,)))),  # batched
    ((4, 3), (3, 4), (((1,), (0,)), ((0,), (1,)))),         # a dense contraction, batched
])
def test_other_contractions_fall_through(x_shape, w_shape, dims):
  x, w = jnp.ones(x_shape), jnp.ones(w_shape)
  jaxpr = str(jax.make_jaxpr(lambda x, w: dense_dot_general(x, w, dims))(x, w))
  assert "custom_vjp_call" not in jaxpr
  np.testing.assert_array_equal(np.asarray(dense_dot_general(x, w, dims)),
                                np.asarray(jax.lax.dot_general(x, w, dims)))


def test_a_dense_contraction_with_an_output_type_falls_through():
  x, w = jnp.ones((4, 3), jnp.bfloat16), jnp.ones((3, 5), jnp.bfloat16)
  dims = (((1,), (0,)), ((), ()))
  f = lambda x, w: dense_dot_general(x, w, dims, preferred_element_type=jnp.float32)
  assert "custom_vjp_call" not in str(jax.make_jaxpr(f)(x, w))
  assert f(x, w).dtype == jnp.float32
