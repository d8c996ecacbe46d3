"""The C++ weight gradients and convolution for XLA:CPU (native/matmul_cpu.cc,
models/native_matmul.py, models/conv.py): x^T dy, a convolution's kernel gradient and
the convolution itself against float64 over odd shapes, bitwise repeatability, sharded
batches, which layers use them, and their FLOPs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.conftest import max_rel_err
from videoldm_jax.models import conv, layers, matmul, native_matmul, temporal
from videoldm_jax.native import build
from videoldm_jax.train import flops as flops_lib

_NO_BUILD = build.unbuildable_reason()
pytestmark = pytest.mark.skipif(_NO_BUILD is not None, reason=f"no kernel here: {_NO_BUILD}")


def _operands(n, a, b, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((n, a), np.float32)),
          jnp.asarray(rng.standard_normal((n, b), np.float32)))


def test_kernel_builds_where_a_compiler_exists():
  assert native_matmul.available(), build.load("matmul")[1]


# (tokens, rows A, columns B): one token; rows that are no whole register tile (6) and
# fewer than one; columns of one vector (16), of a narrow panel (48) and of several wide
# panels with a remainder (80, 272); tokens that are not whole blocks of 256; the
# shapes of W1's feed-forward (64 -> 256, 256 -> 64).
SHAPES = [(1, 5, 16), (300, 7, 48), (257, 130, 80), (1000, 3, 272), (4096, 64, 256),
          (4096, 256, 64)]


@pytest.mark.parametrize("n,a,b", SHAPES)
def test_matches_float64(n, a, b):
  x, dy = _operands(n, a, b)
  got = jax.jit(native_matmul.weight_grad)(x, dy)
  want = np.asarray(x, np.float64).T @ np.asarray(dy, np.float64)
  # Each element is one float32 sum of n products in order: rounding errors of about
  # sqrt(n) x 2^-24 of the terms' size (4e-6 at n = 4096) against sums of size sqrt(n).
  assert got.shape == (a, b) and got.dtype == jnp.float32
  assert max_rel_err(got, want) < 2e-5


def test_bitwise_repeatable():
  x, dy = _operands(4096, 64, 256, seed=1)
  fn = jax.jit(native_matmul.weight_grad)
  np.testing.assert_array_equal(fn(x, dy), fn(x, dy))


def test_refuses_what_it_does_not_take():
  x, dy = _operands(8, 4, 40)  # 40 columns: not whole vectors
  assert not native_matmul.supports(x, dy)
  assert not native_matmul.supports(x.astype(jnp.bfloat16), dy[:, :32].astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="multiple of 16"):
    native_matmul.weight_grad(x, dy)
  # Token counts that differ: the kernel would read dy past its end.
  x8, (_, dy7) = _operands(8, 4, 16)[0], _operands(7, 4, 16)
  assert not native_matmul.supports(x8, dy7)
  with pytest.raises(ValueError, match=r"float32\(8, 4\) and float32\(7, 16\)"):
    native_matmul.weight_grad(x8, dy7)
  # An even kernel: the kernel's padding is KH // 2 on both sides, not XLA's SAME.
  xi, dyi = jnp.ones((1, 6, 6, 8)), jnp.ones((1, 6, 6, 16))
  assert native_matmul.conv_supports(xi, dyi, (3, 3))
  assert not native_matmul.conv_supports(xi, dyi, (2, 2))
  assert not native_matmul.conv_supports(xi, dyi, (3, 2))


@pytest.mark.parametrize("spec", [P(("data", "fsdp")), P("data"), P(None)])
def test_sharded_tokens_are_summed_across_devices(spec):
  # A dense layer's dW with the batch split over devices: each device sums its own
  # tokens and the partial sums are all-reduced; nothing is gathered.
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((8, 64, 24), np.float32))
  w = jnp.asarray(rng.standard_normal((24, 32), np.float32))
  probe = jnp.asarray(rng.standard_normal((8, 64, 32), np.float32))
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(matmul.dense_matmul(x, w) * probe)))
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  ws = jax.device_put(w, NamedSharding(mesh, P("fsdp")))
  hlo = grad.lower(ws, xs).compile().as_text()
  assert "videoldm_weight_grad" in hlo and "all-gather" not in hlo
  assert ("all-reduce" in hlo) == (spec != P(None))
  want = jax.grad(lambda w: jnp.sum((x @ w) * probe))(w)
  assert max_rel_err(grad(ws, xs), want) < 1e-5


def _weight_grad_calls(dtype=jnp.float32, features=32):
  module = layers.dense(features, name="proj", dtype=dtype)
  x = jnp.ones((2, 64, 24), dtype)
  params = module.init(jax.random.key(0), x)
  fn = jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32)))
  return str(jax.make_jaxpr(fn)(params)).count("videoldm_weight_grad"), fn, params


def test_dense_layers_use_it_for_float32_whole_vectors(monkeypatch):
  assert _weight_grad_calls()[0] == 1
  assert _weight_grad_calls(jnp.bfloat16)[0] == 0  # XLA's dots in bfloat16
  assert _weight_grad_calls(features=40)[0] == 0   # not whole vectors
  monkeypatch.setattr(matmul, "USE_KERNEL", False)
  assert _weight_grad_calls()[0] == 0


def test_flops_count_the_dot_it_replaces(monkeypatch):
  _, fn, params = _weight_grad_calls()
  with_kernel = flops_lib.model_flops(fn, params)
  monkeypatch.setattr(matmul, "USE_KERNEL", False)
  calls, fn, params = _weight_grad_calls()  # traced afresh: XLA's dots
  assert calls == 0
  assert flops_lib.model_flops(fn, params) == with_kernel
  # dW alone, 2 x 128 tokens x 24 x 32: the counter removes dead code, and both the
  # forward (grad returns no value; d sum / dy = 1 needs no y) and dx (x is a constant)
  # are dead.
  assert with_kernel == 2 * 128 * 24 * 32


# The convolutions' kernel gradient (models/conv.py): (batch, height, width, in, out,
# kernel size): 3x3 with widths that are no whole vector chunk, one column (every tap
# but the centre column clipped), a 1x1 (a dense layer over pixels) and a 5x5 (padding
# 2, clipped rows and columns on both sides); odd channel counts in.
CONV_SHAPES = [(2, 5, 7, 3, 16, 3), (1, 9, 4, 8, 48, 3), (1, 3, 1, 4, 16, 3),
               (2, 6, 6, 5, 32, 1), (2, 4, 5, 6, 16, 5), (2, 32, 32, 64, 64, 3)]


def _conv_reference(x, dy, k):
  """sum over b, h, w of x_pad[b, h + u, w + v, :]^T dy[b, h, w, :] in float64."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = x.shape[1:3]
  return np.stack([np.stack([np.einsum("bhwi,bhwo->io", xp[:, u:u + h, v:v + w], dy)
                             for v in range(k)]) for u in range(k)])


@pytest.mark.parametrize("b,h,w,i,o,k", CONV_SHAPES)
def test_conv_weight_grad_matches_float64(b, h, w, i, o, k):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((b, h, w, i), np.float32))
  dy = jnp.asarray(rng.standard_normal((b, h, w, o), np.float32))
  got = jax.jit(lambda x, dy: native_matmul.conv_weight_grad(x, dy, (k, k)))(x, dy)
  assert got.shape == (k, k, i, o)
  # Sums of up to b h w = 2048 products in float32 (see test_matches_float64).
  assert max_rel_err(got, _conv_reference(x, dy, k)) < 2e-5


def _conv_same_reference(x, k):
  """The zero-padded cross-correlation of x (B, H, W, I) with k (KH, KW, I, O) in
  float64."""
  x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
  (kh, kw), (h, w) = k.shape[:2], x.shape[1:3]
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return sum(np.einsum("bhwi,io->bhwo", xp[:, u:u + h, v:v + w], k[u, v])
             for u in range(kh) for v in range(kw))


# (batch, height, width, in, out, kernel (KH, KW)): CONV_SHAPES' cases (tokens that are
# no whole register tile, 48 / 80 outputs: a narrow panel and a wide one plus one
# vector, one-column images, 5x5 with taps clipped on both sides), kernels of one row
# or one column, the temporal layers' (3, 1) over (B, T, H*W, C), and images smaller
# than the kernel.
CONV_SAME_SHAPES = [(2, 5, 7, 3, 16, (3, 3)), (1, 9, 4, 8, 48, (3, 3)),
                    (1, 3, 1, 4, 80, (3, 3)), (2, 6, 6, 5, 32, (1, 1)),
                    (2, 4, 5, 6, 16, (5, 5)), (2, 8, 300, 24, 32, (3, 1)),
                    (1, 2, 9, 16, 16, (1, 5)), (1, 1, 2, 7, 64, (5, 5)),
                    (2, 32, 32, 64, 64, (3, 3))]


@pytest.mark.parametrize("b,h,w,i,o,k", CONV_SAME_SHAPES)
def test_conv_same_matches_float64(b, h, w, i, o, k):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((b, h, w, i), np.float32))
  kernel = jnp.asarray(rng.standard_normal((*k, i, o), np.float32))
  got = jax.jit(native_matmul.conv_same)(x, kernel)
  assert got.shape == (b, h, w, o) and got.dtype == jnp.float32
  # Sums of at most 9 x 64 = 576 products in float32: errors of ~sqrt(576) 2^-24 of the
  # terms against sums of size ~sqrt(576).
  assert max_rel_err(got, _conv_same_reference(x, kernel)) < 1e-5
  np.testing.assert_array_equal(got, jax.jit(native_matmul.conv_same)(x, kernel))


def test_conv_same_refuses_what_it_does_not_take():
  x = jnp.ones((1, 4, 4, 8), jnp.float32)
  assert not native_matmul.conv_same_supports(x, jnp.ones((3, 3, 8, 40)))   # 40 outputs
  assert not native_matmul.conv_same_supports(x, jnp.ones((2, 3, 8, 16)))   # even
  assert not native_matmul.conv_same_supports(x, jnp.ones((3, 17, 8, 16)))  # too wide
  assert not native_matmul.conv_same_supports(x, jnp.ones((3, 3, 4, 16)))   # 8 != 4 in
  assert not native_matmul.conv_same_supports(x.astype(jnp.bfloat16),
                                              jnp.ones((3, 3, 8, 16), jnp.bfloat16))
  with pytest.raises(ValueError, match=r"multiple of 16.*\(3, 3, 8, 40\)"):
    native_matmul.conv_same(x, jnp.ones((3, 3, 8, 40)))
  # An image of width (or height) 0: the weight-gradient kernel divided by W (the
  # process died of SIGFPE); XLA's forms take it, a kernel gradient of zeros.
  empty = jnp.ones((1, 4, 0, 8), jnp.float32)
  assert not native_matmul.conv_same_supports(empty, jnp.ones((3, 3, 8, 16)))
  assert not native_matmul.conv_supports(empty, jnp.ones((1, 4, 0, 16)), (3, 3))
  assert not conv.takes(empty, jnp.ones((3, 3, 8, 16)))
  same = lambda w: conv.conv_general_dilated(empty, w, (1, 1), "SAME", dimension_numbers=(
      "NHWC", "HWIO", "NHWC")).sum()
  np.testing.assert_array_equal(jax.grad(same)(jnp.ones((3, 3, 8, 16))),
                                np.zeros((3, 3, 8, 16), np.float32))


def _conv_layer_grads(features=32, stride=1, dtype=jnp.float32, seed=4, in_channels=24):
  module = layers.conv2d(features, stride=stride, name="conv", dtype=dtype)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 8, 12, in_channels), np.float32)).astype(dtype)
  params = module.init(jax.random.key(0), x)
  probe = jnp.asarray(rng.standard_normal(module.apply(params, x).shape, np.float32))
  fn = jax.value_and_grad(
      lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32) * probe), argnums=(0, 1))
  jaxpr = str(jax.make_jaxpr(fn)(params, x))
  calls = jaxpr.count("videoldm_conv_weight_grad"), jaxpr.count("videoldm_conv_same")
  return calls, jax.jit(fn)(params, x), fn, params, x


def test_conv_layers_use_it_for_float32_stride_1(monkeypatch):
  # The forward pass and (32 input channels: whole vectors) the input gradient too.
  assert _conv_layer_grads(in_channels=32)[0] == (1, 2)
  calls, ours, *_ = _conv_layer_grads()
  assert calls == (1, 1)  # 24 input channels: the input gradient is XLA's
  assert _conv_layer_grads(stride=2)[0] == (0, 0)           # the downsamplers: XLA's
  assert _conv_layer_grads(dtype=jnp.bfloat16)[0] == (0, 0)
  assert _conv_layer_grads(features=40)[0] == (0, 0)        # not whole vectors
  monkeypatch.setattr(conv, "USE_NATIVE_CONV", False)
  assert _conv_layer_grads(in_channels=32)[0] == (1, 0)
  monkeypatch.setattr(matmul, "USE_KERNEL", False)
  calls, xla, *_ = _conv_layer_grads()
  assert calls == (0, 0)
  # Loss and both gradients equal XLA's to float32 rounding of sums over 9 x 24 terms
  # (loss, input gradient) and 192 pixels x 9 taps (kernel gradient); the bias
  # gradient is XLA's sum either way.
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(xla)):
    assert max_rel_err(a, b) < 1e-5


@pytest.mark.parametrize("features", [32, 48])
def test_conv_input_gradient_matches_xla(features, monkeypatch):
  # 32 input channels: dx from the C++ convolution of dy with the flipped, transposed
  # kernel; XLA's transposed convolution for reference.
  calls, ours, *_ = _conv_layer_grads(features=features, in_channels=32)
  assert calls == (1, 2)
  monkeypatch.setattr(matmul, "USE_KERNEL", False)
  calls, xla, *_ = _conv_layer_grads(features=features, in_channels=32)  # traced afresh
  assert calls == (0, 0)
  assert max_rel_err(ours[1][1], xla[1][1]) < 1e-5


def test_time_only_conv_reads_frames_in_place(monkeypatch):
  # The temporal layers' (3, 1, 1) convolution: the C++ convolution of (B, T, H*W, C)
  # with no shifted copies, against the concatenated matmul it replaces.
  module = temporal.conv3d(32, (3, 1, 1), name="conv", init=layers.FAN_IN_NORMAL)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 5, 4, 6, 32), np.float32))
  params = module.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)  # a nonzero bias
  probe = jnp.asarray(rng.standard_normal((2, 5, 4, 6, 32), np.float32))

  def value_and_grads():  # traced afresh: module.apply reads matmul.USE_KERNEL
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(module.apply(p, x) * probe),
                                      argnums=(0, 1)))

  fn = value_and_grads()
  hlo = fn.lower(params, x).as_text()
  assert "concatenate" not in hlo
  assert hlo.count("videoldm_conv_same") == 2 and "videoldm_conv_weight_grad" in hlo
  ours = fn(params, x)
  monkeypatch.setattr(matmul, "USE_KERNEL", False)
  fn = value_and_grads()
  assert "concatenate" in fn.lower(params, x).as_text()
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(fn(params, x))):
    assert max_rel_err(a, b) < 1e-5


def test_conv_flops_count_the_convolution_it_replaces(monkeypatch):
  _, _, fn, params, x = _conv_layer_grads(in_channels=32)
  with_kernel = flops_lib.model_flops(fn, params, x)
  monkeypatch.setattr(matmul, "USE_KERNEL", False)
  calls, _, fn, params, x = _conv_layer_grads(in_channels=32)  # traced afresh
  assert calls == (0, 0)
  assert flops_lib.model_flops(fn, params, x) == with_kernel
  # forward, input gradient, kernel gradient: 2 x 2 x 8 x 12 x 9 x 32 x 32 each
  assert with_kernel == 3 * 2 * (2 * 8 * 12) * 9 * 32 * 32


@pytest.mark.parametrize("spec", [P("data"), P(None)])
def test_conv_sharded_batch_is_summed_across_devices(spec):
  # The forward pass and the input gradient run on each device's own images (x's batch
  # sharding kept), the kernel gradient's partial sums are all-reduced; nothing is
  # gathered.
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  module = layers.conv2d(32, name="conv")
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 16), np.float32))
  params = nn.meta.unbox(module.init(jax.random.key(0), x))
  probe = jnp.asarray(rng.standard_normal((4, 8, 8, 32), np.float32))
  loss = lambda p, x, probe: jnp.sum(module.apply(p, x) * probe)  # noqa: E731
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  xs, probes = (jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, probe))
  hlo = grad.lower(params, xs, probes).compile().as_text()
  assert "videoldm_conv_weight_grad" in hlo and "all-gather" not in hlo
  assert hlo.count('custom_call_target="videoldm_conv_same"') == 2
  assert ("all-reduce" in hlo) == (spec != P(None))
  value, (got, dx) = grad(params, xs, probes)
  assert max_rel_err(value, loss(params, x, probe)) < 1e-5
  assert dx.sharding.is_equivalent_to(xs.sharding, 4)
  assert max_rel_err(got["params"]["kernel"], _conv_reference(x, probe, 3)) < 1e-5
  want_dx = jax.grad(lambda x: jnp.sum(_xla_conv(params, x) * probe))(x)
  assert max_rel_err(dx, want_dx) < 1e-5


def _xla_conv(params, x):
  k, b = params["params"]["kernel"], params["params"]["bias"]
  return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
