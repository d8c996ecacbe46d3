"""The C++ attention kernel for XLA:CPU (native/attention_cpu.cc, models/native_attention.py)
against the softmax formula: values and gradients over odd shapes, bitwise repeatability,
sharded operands, the model's choice of path, and the fallback when it cannot be built."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.conftest import max_rel_err
from videoldm_jax.models import attention as attention_lib
from videoldm_jax.models import native_attention
from videoldm_jax.native import build

# Skipped only where no kernel is meant to be built; with a compiler a failed build
# fails test_kernel_builds_where_a_compiler_exists instead of skipping everything.
_NO_BUILD = build.unbuildable_reason()
pytestmark = pytest.mark.skipif(_NO_BUILD is not None, reason=f"no kernel here: {_NO_BUILD}")


def test_kernel_builds_where_a_compiler_exists():
  assert native_attention.available(), native_attention.unavailable_reason()


def _formula(q, k, v):
  logits = jnp.einsum("blhd,bshd->bhls", q, k) * q.shape[-1] ** -0.5
  return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(logits, axis=-1), v)


def _arrays(b, length, keys, heads, dim, seed=0):
  rng = np.random.default_rng(seed)
  # Logits of several units: the softmax is far from uniform, so errors in the max
  # subtraction, the exponential or the normalisation show. (Scaled in NumPy: an eager
  # multiply compiles a program for every new shape.)
  q = jnp.asarray(rng.standard_normal((b, length, heads, dim), np.float32) * 2)
  k = jnp.asarray(rng.standard_normal((b, keys, heads, dim), np.float32) * 2)
  v = jnp.asarray(rng.standard_normal((b, keys, heads, dim), np.float32))
  g = jnp.asarray(rng.standard_normal((b, length, heads, dim), np.float32))
  return q, k, v, g


def _grads(fn, q, k, v, g):
  return jax.jit(jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v), g), argnums=(0, 1, 2)))(q, k, v)


# The formula as one program: op by op, it and the error arithmetic (now NumPy's) compiled
# a program per op and shape, 21 programs for each case below instead of 6.
_formula_jit = jax.jit(_formula)


# (batch, queries, keys, heads, head dim): the W1 / W2 level-0 shape; keys and head dims
# that are not whole vectors (16 floats with AVX-512, 8 with AVX2); one key (a context of
# length 1); more queries than one task's chunk; SD's head dims 40 and 80; row counts
# that leave the last rows of a register tile (12 rows narrow, 6 wide) one short:
# 23 and 35 = 11 mod 12, 29 = 5 mod 6 with the wide tiles of head dim 80.
SHAPES = [(2, 1024, 1024, 2, 32), (1, 100, 77, 3, 40), (2, 37, 1, 2, 16),
          (1, 1500, 70, 1, 80), (3, 64, 300, 2, 64), (1, 23, 35, 1, 16),
          (1, 11, 29, 1, 80),
          # 67 query blocks (a prime): the tasks' chunks of blocks are uneven on any
          # thread count, and the last chunk must still be computed.
          (1, 17000, 16, 1, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_softmax_formula(shape):
  q, k, v, g = _arrays(*shape)
  assert max_rel_err(jax.jit(native_attention.attention)(q, k, v), _formula_jit(q, k, v)) < 1e-5
  for got, want in zip(_grads(native_attention.attention, q, k, v, g),
                       _grads(_formula, q, k, v, g)):
    # Relative to the largest gradient, or absolute where that is ~0 (dq with one key:
    # the softmax of a single logit is constant, so dq is rounding noise around 0).
    got, want = np.asarray(got), np.asarray(want)
    err = float(np.max(np.abs(got - want)))
    assert err < 1e-5 * max(float(np.max(np.abs(want))), 1.0), err


def test_logits_far_apart_underflow_to_zero_weight():
  # Logit spreads of thousands: the exponential of the most negative differences must
  # give 0, not overflow its exponent bits into garbage (the kernel clamps at -87).
  q, k, v, g = _arrays(1, 16, 40, 1, 16)
  q, k = np.asarray(q) * 30, np.asarray(k) * 30  # (spreads up to ~28000: one-hot softmax)
  assert max_rel_err(jax.jit(native_attention.attention)(q, k, v), _formula_jit(q, k, v)) < 1e-5
  (dq, dk, dv), (_, _, want_dv) = (_grads(f, q, k, v, g)
                                   for f in (native_attention.attention, _formula))
  assert max_rel_err(dv, want_dv) < 1e-5
  # One-hot rows pass no gradient to q and k (the formula's are ~1e-20): rounding noise.
  assert np.max(np.abs(dq)) < 1e-4 and np.max(np.abs(dk)) < 1e-4


def test_mismatched_operands_are_refused_and_a_shared_context_broadcast():
  # The kernel reads every size from q and k: mismatched operands were read out of
  # bounds (garbage without an error) and zero keys divided by zero (SIGFPE).
  q, k, v, _ = _arrays(2, 8, 5, 2, 16)
  for bad_k, bad_v in ((k[:1], v[:1]), (k[..., :8], v[..., :8]), (k, v[:, :4]),
                       (k[:, :0], v[:, :0])):
    with pytest.raises(ValueError, match="same B, H, D and S >= 1"):
      native_attention.attention(q, bad_k, bad_v)
  # One context for the whole batch (keys of batch 1): the kernel's path gives the
  # formula's broadcast result (it read past the end of k and v).
  flat = lambda x: x.reshape(x.shape[:2] + (-1,))
  assert attention_lib.attention_path(8, 5) == "native"
  got = attention_lib.dot_product_attention(flat(q), flat(k[:1]), flat(v[:1]), 2)
  shared = lambda x: jnp.broadcast_to(x[:1], x.shape)
  np.testing.assert_allclose(got, flat(_formula(q, shared(k), shared(v))), rtol=1e-5,
                             atol=1e-6)
  attention_lib.set_implementation("plain")
  try:
    plain = attention_lib.dot_product_attention(flat(q), flat(k[:1]), flat(v[:1]), 2)
  finally:
    attention_lib.set_implementation("auto")
  np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)


def test_heads_a_tensor_axis_cannot_split():
  # A tensor axis of 4 splits the projections' width 2 * 16 but not the 2 heads: the
  # kernel's partitioner got operands split over the head dim and the compile failed.
  # Under the trainer's mesh (`partitioned`) the operands are pinned to what it takes.
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("data", "tensor"))
  x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 32)),
                                 jnp.float32), NamedSharding(mesh, P(None, None, "tensor")))
  loss = lambda q: jnp.sum(attention_lib.dot_product_attention(q, q, q, num_heads=2) ** 2)
  with attention_lib.partitioned(mesh, ("data",), ("tensor",)):
    assert attention_lib.attention_path(16, 16) == "native"
    value, grad = jax.jit(jax.value_and_grad(loss))(x)
  attention_lib.set_implementation("plain")
  try:
    want_value, want_grad = jax.jit(jax.value_and_grad(loss))(x)
  finally:
    attention_lib.set_implementation("auto")
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_bitwise_repeatable():
  # Each element is summed in a fixed order whatever thread runs its task.
  q, k, v, g = _arrays(2, 512, 512, 4, 32, seed=3)
  fn = jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.vdot(native_attention.attention(q, k, v), g), argnums=(0, 1, 2)))
  first, second = fn(q, k, v), fn(q, k, v)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec", [P("data"), P(None, None, "data"), P("data", None, "model")])
def test_sharded_operands_stay_sharded(spec):
  # Batch and heads keep their sharding through forward and backward (no all-gather,
  # each device runs the kernel on its own part); the values equal the formula's.
  devices = np.array(jax.devices()[:4])
  mesh = Mesh(devices.reshape(2, 2) if "model" in spec else devices[:2].reshape(2, 1),
              ("data", "model"))
  sharding = NamedSharding(mesh, spec)
  q, k, v, g = (jax.device_put(x, sharding) for x in _arrays(4, 256, 256, 4, 32, seed=5))
  step = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(native_attention.attention(q, k, v), g),
                          argnums=(0, 1, 2)))
  hlo = step.lower(q, k, v).compile().as_text()
  assert "videoldm_attention_backward" in hlo and "all-gather" not in hlo
  got = step(q, k, v)
  for a, want in zip(got, _grads(_formula, q, k, v, g)):
    assert a.sharding.is_equivalent_to(sharding, 4)
    assert max_rel_err(a, want) < 1e-5


def test_model_path_uses_the_kernel_on_cpu_only():
  # Long self-attention, the temporal attention of an 8-frame clip, cross-attention on
  # one context token: all through the kernel on CPU unless another path is asked for.
  sizes = [(512, 512), (8, 8), (64, 1)]
  jaxpr = lambda length, keys: str(jax.make_jaxpr(
      lambda q, kv: attention_lib.dot_product_attention(q, kv, kv, num_heads=2))(
          jnp.ones((3, length, 64)), jnp.ones((3, keys, 64))))
  try:
    for name, platform, native in [("auto", "cpu", True), ("native", "cpu", True),
                                   ("blocked", "cpu", False), ("auto", "tpu", False)]:
      attention_lib.set_implementation(name, platform)
      assert attention_lib.use_native() == native, (name, platform)
      if platform == "cpu":
        for length, keys in sizes:
          assert ("videoldm_attention_forward" in jaxpr(length, keys)) == native, (
              name, length, keys)
    attention_lib.set_implementation("native", "tpu")
    with pytest.raises(ValueError, match="CPU kernel"):
      attention_lib.use_native()
  finally:
    attention_lib.set_implementation("auto")


_FALLBACK = """
import json, jax, jax.numpy as jnp, numpy as np
from videoldm_jax.models import attention, layers, native_attention, native_matmul
from videoldm_jax.models import params as params_lib
# (NumPy draws and initialisers, jitted calls, NumPy checks: op by op, with jax.random,
# this process compiled 113 small programs.)
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((1, 512, 64), np.float32))
out = jax.jit(lambda q: attention.dot_product_attention(q, q, q, num_heads=2))(q)  # no failure
dense = layers.dense(32, name="proj")  # its weight gradient: XLA's dots, not the kernel
params = {"params": params_lib.init_params(dense, 1, q)}
grads = jax.jit(jax.grad(lambda p: jnp.sum(dense.apply(p, q) ** 2)))(params)
# The convolutions: XLA's 3x3, the temporal (3, 1, 1) as its concatenated matmul.
from videoldm_jax.models import temporal
x = rng.standard_normal((2, 3, 4, 4, 32), np.float32)
convs = [layers.conv2d(32, name="c2"),
         temporal.conv3d(32, (3, 1, 1), name="c3", init=layers.FAN_IN_NORMAL)]
for conv_layer, xs in zip(convs, (x[0], x)):
  p = {"params": params_lib.init_params(conv_layer, 3, xs)}
  fn = lambda p, xs: jnp.sum(conv_layer.apply(p, xs) ** 2)
  assert "videoldm" not in str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(p, xs))
  grads = (grads, jax.jit(jax.grad(fn, argnums=(0, 1)))(p, xs))
attention.set_implementation("native")
try:
  attention.dot_product_attention(q, q, q, num_heads=2)
  error = ""
except RuntimeError as e:
  error = str(e)
print(json.dumps(dict(available=native_attention.available(),
                      reason=native_attention.unavailable_reason(), error=error,
                      finite=bool(np.isfinite(out).all()), matmul=native_matmul.available(),
                      dense_finite=all(bool(np.isfinite(g).all())
                                       for g in jax.tree.leaves(grads)))))
"""


@pytest.mark.parametrize("env, reason", [({"CXX": "no-such-compiler-xyz"}, "no usable C++ compiler"),
                                         ({"VIDEOLDM_JAX_NATIVE": "0"}, "VIDEOLDM_JAX_NATIVE=0")])
def test_falls_back_to_xla_without_the_kernel(tmp_path, env, reason):
  # A fresh process with an empty cache and no way to build: the model runs on XLA's
  # blocked path, dense layers and convolutions on XLA's dots and convolutions (no
  # custom call traced), and only an explicit "native"
  # attention request fails, saying why.
  run_env = dict(os.environ, VIDEOLDM_JAX_NATIVE_CACHE=str(tmp_path), **env)
  proc = subprocess.run([sys.executable, "-c", _FALLBACK], env=run_env, capture_output=True,
                        text=True, cwd=Path(__file__).parents[1], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == dict(available=False, reason=result["reason"], error=result["error"],
                        finite=True, matmul=False, dense_finite=True)
  assert reason in result["reason"] and reason in result["error"]
  assert not list(tmp_path.iterdir())


def test_library_name_changes_with_source_compiler_and_cpu(monkeypatch, tmp_path):
  # The cache key: a library built for another CPU, compiler or source is never loaded.
  compiler = "/usr/bin/g++"
  base = build.library_path("attention", compiler)
  assert base == build.library_path("attention", compiler)
  assert base != build.library_path("attention", "/usr/bin/clang++")
  # An edited source or shared header: copies with one more line.
  for name, path in (("source", build.SOURCES["attention"]), ("header", build.HEADERS[0])):
    edited = tmp_path / f"{name}_{path.name}"
    edited.write_bytes(path.read_bytes() + b"// edited\n")
    with monkeypatch.context() as m:
      if name == "source":
        m.setitem(build.SOURCES, "attention", edited)
      else:
        m.setattr(build, "HEADERS", (edited,))
      assert base != build.library_path("attention", compiler), name
  assert base == build.library_path("attention", compiler)
  monkeypatch.setattr(build, "_cpu_flags", lambda: "flags : fpu sse2")
  assert base != build.library_path("attention", compiler)
  cpu = build.library_path("attention", compiler)
  # Another jaxlib: its FFI headers may differ from those the library was built with.
  monkeypatch.setattr(build.jaxlib, "__version__", "0.0.0")
  assert cpu != build.library_path("attention", compiler)


def test_compiler_with_arguments_and_a_shareable_library(monkeypatch, tmp_path):
  # $CXX may be a command with arguments ("ccache g++"); it was looked up whole on PATH
  # and taken for "no compiler". The library is readable by the other users of a
  # shared cache (mkstemp made it 0600: they fell back to XLA without rebuilding).
  monkeypatch.setenv("CXX", "env g++")
  compiler = build._compiler()
  assert compiler is not None and compiler.endswith("env g++")
  target = tmp_path / "attention.so"
  build._build("attention", compiler, target)
  assert target.stat().st_mode & 0o777 == 0o755
  assert list(tmp_path.iterdir()) == [target]
  # A $CXX shlex cannot read (an unbalanced quote) is unusable, not a crash of every
  # attention call.
  monkeypatch.setenv("CXX", 'g++ "-O2')
  assert build._compiler() is None and "no usable C++ compiler" in build.unbuildable_reason()


def test_a_damaged_cached_library_is_built_again(tmp_path):
  # A cache entry that does not load (truncated by a crash or a full disk) made every
  # later run fall back to XLA, with a warning, until the file was deleted by hand.
  if build.unbuildable_reason():
    pytest.skip(build.unbuildable_reason())
  code = ("import logging, sys\n"
          "from videoldm_jax.native import build\n"
          "logging.basicConfig(level=logging.WARNING)\n"
          "path = build.library_path('attention', build._compiler())\n"
          "path.parent.mkdir(parents=True, exist_ok=True)\n"
          "path.write_bytes(b'\\x7fELF truncated')\n"
          "lib, reason = build.load('attention')\n"
          "assert lib is not None, reason\n"
          "print(path.stat().st_size)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(os.environ, VIDEOLDM_JAX_NATIVE_CACHE=str(tmp_path)),
                        cwd=Path(__file__).parents[1], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "is damaged" in proc.stderr and "building it again" in proc.stderr
  assert int(proc.stdout.split()[-1]) > 10_000
  # A whole library is not taken for a damaged one; its last bytes cut off, it is.
  lib = tmp_path / build.library_path("attention", build._compiler()).name  # (rebuilt)
  assert not build._elf_damaged(lib)
  cut = tmp_path / "cut.so"
  cut.write_bytes(lib.read_bytes()[:-100])
  assert build._elf_damaged(cut)


def test_kernels_under_vmap():
  # custom_partitioning has no batching rule: jax.vmap of any CPU layer that reached a
  # kernel raised NotImplementedError. The kernels map element by element now.
  # (Every mapped function jitted, the parameters drawn in NumPy: op by op, with
  # jax.random initialisers, the test compiled 146 small programs, now 20.)
  from videoldm_jax.models import layers
  from videoldm_jax.models import params as params_lib
  q, k, v, _ = _arrays(6, 8, 5, 2, 16)
  q, k, v = (np.asarray(x).reshape((3, 2) + x.shape[1:]) for x in (q, k, v))
  np.testing.assert_allclose(jax.jit(jax.vmap(native_attention.attention))(q, k, v),
                             jax.jit(jax.vmap(_formula))(q, k, v), rtol=1e-5, atol=1e-6)
  shared = jax.jit(jax.vmap(native_attention.attention, in_axes=(0, None, None)))(
      q, k[0], v[0])
  np.testing.assert_allclose(shared, jax.jit(jax.vmap(_formula, in_axes=(0, None, None)))(
      q, k[0], v[0]), rtol=1e-5, atol=1e-6)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
  for got, want in zip(
      jax.jit(jax.vmap(jax.grad(loss(native_attention.attention), argnums=(0, 1, 2))))(q, k, v),
      jax.jit(jax.vmap(jax.grad(loss(_formula), argnums=(0, 1, 2))))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Per-example gradients of a convolution and a dense layer (C++ forward and weight
  # gradients) equal the gradients taken one example at a time.
  rng = np.random.default_rng(1)
  for module, x in ((layers.conv2d(16, 3, name="c"), rng.standard_normal((3, 1, 6, 6, 16))),
                    (layers.dense(32, ("embed", "mlp"), name="d"),
                     rng.standard_normal((3, 10, 16)))):
    x = x.astype(np.float32)
    params = {"params": params_lib.init_params(module, 0, x[0])}
    grad = jax.grad(lambda p, xi: jnp.sum(module.apply(p, xi) ** 2))
    batched = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(params, x)
    one = jax.jit(grad)
    for i in range(3):
      for a, b in zip(jax.tree_util.tree_leaves(batched),
                      jax.tree_util.tree_leaves(one(params, x[i]))):
        np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-5)
