"""Splash attention (models/splash_attention.py): the TPU kernel, run here in Pallas'
interpreter against XLA's formula, per shard under a mesh, and its FLOPs. Its compiles
for a TPU v5e are in test_compile_check.py (libtpu serves one process at a time, and
the suite's workers take whole files)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.conftest import max_rel_err
from videoldm_jax import sharding
from videoldm_jax.models import attention as attention_lib
from videoldm_jax.train import flops

HEADS, TOKENS, HEAD_DIM = 4, 256, 40  # 16 x 16 latent tokens: two 128-token tiles


def _inputs(batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  shape = (batch, TOKENS, HEADS * HEAD_DIM)
  return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4)]


def _loss(q, k, v, w):
  return jnp.sum(attention_lib.dot_product_attention(q, k, v, HEADS) * w)


def _run(implementation: str, mesh, q, k, v, w):
  """(output, grads wrt q, k, v, the jaxpr's text) under `implementation`, traced as the
  train step is: under `attention.partitioned(mesh, ...)` (no mesh: outside it)."""
  before = attention_lib.implementation()
  attention_lib.set_implementation(implementation)
  context = (attention_lib.partitioned(mesh, ("data", "fsdp"), ("tensor",)) if mesh
             else contextlib.nullcontext())
  try:
    with context:
      out = jax.jit(lambda q, k, v: attention_lib.dot_product_attention(q, k, v, HEADS))(
          q, k, v)
      grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))(q, k, v, w)
      text = str(jax.make_jaxpr(jax.grad(_loss, argnums=(0, 1, 2)))(q, k, v, w))
    return out, grad, text
  finally:
    attention_lib.set_implementation(*before)


@pytest.fixture(scope="module")
def mesh():
  # 2-way batch ("data") and 2-way heads ("tensor"): each device runs a quarter.
  return sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])


def test_splash_matches_the_formula_per_shard_under_a_mesh(mesh):
  q, k, v, w = _inputs(batch=4)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor")))
  q, k, v, w = map(put, (q, k, v, w))
  ref_out, ref_grads, ref_text = _run("plain", mesh, q, k, v, w)
  out, grads, text = _run("splash", mesh, q, k, v, w)
  assert "pallas_call" in text and "shard_map" in text and "pallas_call" not in ref_text
  assert max_rel_err(out, ref_out) < 1e-5
  for name, g, r in zip("qkv", grads, ref_grads):
    assert max_rel_err(g, r) < 1e-5, name
  assert out.sharding.spec == P("data", None, "tensor")


def test_splash_leaves_what_it_cannot_run_to_the_formula(mesh):
  q, k, v, w = _inputs(batch=3)  # 3 frames over a 2-way batch axis: no even shards
  out, grads, text = _run("splash", mesh, q, k, v, w)
  ref_out, _, _ = _run("plain", mesh, q, k, v, w)
  assert "pallas_call" not in text
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
  # bf16 under the tests' jax_default_matmul_precision="highest", which Mosaic refuses
  # for half-precision matmuls: the formula too.
  q, k, v, w = (x.astype(jnp.bfloat16) for x in _inputs(batch=4))
  assert "pallas_call" not in _run("splash", mesh, q, k, v, w)[2]
  with jax.default_matmul_precision("default"):
    assert "pallas_call" in _run("splash", mesh, q, k, v, w)[2]
  from videoldm_jax.models import splash_attention
  with jax.default_matmul_precision("highest"):  # float16 is half precision too
    assert not splash_attention.precision_allows(jnp.float16)
    assert splash_attention.precision_allows(jnp.float32)
  # Traced outside `partitioned` (sampling, exports, latent caching): no mesh is known,
  # and Mosaic would refuse an unpartitioned kernel in a program over several devices.
  q, k, v, w = _inputs(batch=4)
  assert "pallas_call" not in _run("splash", None, q, k, v, w)[2]
  # A head dim over MAX_HEAD_DIM (the SD VAE's one 512-wide head): the formula (asked
  # under the splash implementation, which takes head dim 40).
  before = attention_lib.implementation()
  attention_lib.set_implementation("splash")
  try:
    assert attention_lib.attention_path(TOKENS, TOKENS, jnp.float32, 40) == "splash"
    assert attention_lib.attention_path(TOKENS, TOKENS, jnp.float32, 512) != "splash"
    # Keys no multiple of the kernel's tile: SD's 77-token cross-attention.
    assert attention_lib.attention_path(1024, 1024, jnp.float32, 40) == "splash"
    assert attention_lib.attention_path(1024, 77, jnp.float32, 40) != "splash"
  finally:
    attention_lib.set_implementation(*before)
  # Heads the head axis cannot split evenly (3 on 2 devices): the formula, not an error.
  q3 = jnp.zeros((4, TOKENS, 3 * HEAD_DIM))
  attention_lib.set_implementation("splash")
  try:
    with attention_lib.partitioned(mesh, ("data", "fsdp"), ("tensor",)):
      text = str(jax.make_jaxpr(lambda q: attention_lib.dot_product_attention(q, q, q, 3))(q3))
  finally:
    attention_lib.set_implementation(*before)
  assert "pallas_call" not in text
  # A mesh axis cannot split both the batch and the heads.
  with pytest.raises(ValueError, match="split both the batch"):
    with attention_lib.partitioned(mesh, ("data", "tensor"), ("tensor",)):
      pass


def test_splash_flops_count_what_the_kernel_executes(mesh):
  # B H L S D = 2 x 4 x 256 x 256 x 40. Forward: q k^T and p v, 2 x 2 BHLSD. Backward:
  # the dq kernel recomputes q k^T and computes dp = do v^T and dq = ds k (3 matmuls),
  # the dkv kernel q k^T, dp, dv = p^T do and dk = ds^T q (4): 14 BHLSD; plus the row
  # sums di = sum_d(do * o), 2 BHLD. Under the mesh the shard_map's body sees a quarter
  # of the batch x heads, counted once per shard: the same total as on one device.
  b, h, n, d = 2, HEADS, TOKENS, HEAD_DIM
  expected = 18 * b * h * n * n * d + 2 * b * h * n * d
  spec = jax.ShapeDtypeStruct((b, TOKENS, HEADS * HEAD_DIM), jnp.float32)
  grad = jax.grad(_loss, argnums=(0, 1, 2))
  before = attention_lib.implementation()
  try:
    attention_lib.set_implementation("splash")
    for m in (sharding.make_mesh({"data": 1}, jax.devices()[:1]), mesh):
      with attention_lib.partitioned(m, ("data", "fsdp"), ("tensor",)):
        assert "pallas_call" in str(jax.make_jaxpr(grad)(spec, spec, spec, spec))
        assert flops.model_flops(grad, spec, spec, spec, spec) == expected, m
  finally:
    attention_lib.set_implementation(*before)

