"""The model-FLOP counter (train/flops.py) and the blocked attention used on CPU.

FLOP counts are checked against PyTorch's FlopCounterMode on the same block (exact) and
against hand derivations; blocked attention against the plain softmax formula, values
and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from videoldm_jax.models import attention as attention_lib
from videoldm_jax.models import blocked_attention as blocked_lib
from videoldm_jax.models.attention import BasicTransformerBlock
from videoldm_jax.models.unet import Downsample, ResBlock, Upsample
from videoldm_jax.train.flops import model_flops


def _step_flops(module, *inputs) -> int:
  """FLOPs of loss value + gradient w.r.t. every parameter (a training step's work)."""
  params = module.init(jax.random.key(0), *inputs)
  return model_flops(jax.value_and_grad(lambda p: jnp.sum(module.apply(p, *inputs))), params)


def test_resblock_flops_equal_torch_flop_counter(torch_cpu):
  torch = torch_cpu
  from diffusers.models.resnet import ResnetBlock2D
  from torch.utils.flop_counter import FlopCounterMode
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 32), np.float32)
  temb = rng.standard_normal((2, 64), np.float32)
  block = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=64, groups=8)
  counter = FlopCounterMode(display=False)
  with counter:
    block(torch.tensor(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(temb)).sum().backward()
  assert _step_flops(ResBlock(64, norm_num_groups=8), x, temb) == counter.get_total_flops()


@pytest.mark.parametrize("which", ["down", "up"])
def test_resampler_flops_equal_torch_flop_counter(torch_cpu, which):
  # JAX writes a strided convolution's input gradient as a transposed convolution
  # (lhs dilation): counted at its output size it cost 4x the forward instead of 1x.
  # The upsampler's phase convolution must count as diffusers' upsample-then-conv.
  torch = torch_cpu
  from diffusers.models.downsampling import Downsample2D
  from diffusers.models.upsampling import Upsample2D
  from torch.utils.flop_counter import FlopCounterMode
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 16), np.float32)
  ours, ref = ((Downsample(), Downsample2D(16, use_conv=True, padding=1)) if which == "down"
               else (Upsample(), Upsample2D(16, use_conv=True)))
  counter = FlopCounterMode(display=False)
  xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
  with counter:
    # Squared: a plain sum's gradient does not need the forward (pruned as dead code).
    # The input's gradient too: the block sits inside a network.
    ref(xt).square().sum().backward()
  params = ours.init(jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(jnp.square(ours.apply(p, x)))
  flops = model_flops(jax.grad(loss, argnums=(0, 1)), params, x)
  # The counter counts what runs: layers.UpsampleConv does 16 of the 36 multiply-adds
  # per input pixel of diffusers' upsample-then-3x3-conv (four 2x2 phase kernels), in
  # the forward and in both gradients; the strided conv is the same work as torch's.
  expected = counter.get_total_flops() * (4 if which == "up" else 9) // 9  # 16/36 = 4/9
  assert flops == expected


def test_transposed_conv_step_flops_equal_torch_flop_counter(torch_cpu):
  # The kernel gradient of a transposed convolution (lhs-dilated input, the large output
  # gradient as the window, the kernel's taps as output) was counted at window x taps:
  # 4x its forward at stride 2 (a step of 230400 against torch's 115200).
  torch = torch_cpu
  from torch.utils.flop_counter import FlopCounterMode
  x, w = jnp.ones((2, 5, 5, 4)), jnp.ones((4, 4, 6, 4))
  f = lambda x, w: jax.lax.conv_transpose(x, w, (2, 2), [(2, 2)] * 2, transpose_kernel=True,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  loss = lambda x, w: jnp.sum(jnp.square(f(x, w)))
  with FlopCounterMode(display=False) as counter:
    torch.nn.functional.conv_transpose2d(  # (torch's padding 1 = JAX's 4 - 1 - 1 = 2)
        torch.ones(2, 4, 5, 5, requires_grad=True), torch.ones(4, 6, 4, 4, requires_grad=True),
        stride=2, padding=1).square().sum().backward()
  # Each of forward, input and kernel gradient: 2 x 2 x (5 x 5) x 4 x 6 x (4 x 4) = 38400.
  assert model_flops(f, x, w) == 38400
  assert model_flops(jax.grad(loss, argnums=(0, 1)), x, w) == counter.get_total_flops() == (
      3 * 38400)


def _transformer_flops(b, length, width, ctx_len, ctx_dim, self_attn_backward: float,
                       cross_attn_backward: float) -> int:
  """Hand count for BasicTransformerBlock: forward + backward, weights trained, the
  context not (its k/v projections get no input gradient)."""
  linear = (2 * b * length * width * width * 4          # attn1 q, k, v, out
            + 2 * b * length * width * width * 2        # attn2 q, out
            + 2 * b * ctx_len * ctx_dim * width * 2     # attn2 k, v (on the context)
            + 2 * b * length * width * 8 * width        # GEGLU proj to 2 x 4C
            + 2 * b * length * 4 * width * width)       # ff out
  ctx_kv = 2 * b * ctx_len * ctx_dim * width * 2
  attn1 = 2 * b * length * length * width * 2           # q k^T and p v
  attn2 = 2 * b * length * ctx_len * width * 2
  # forward + weight gradients + input gradients of every linear; attention cores:
  # forward + backward (plain: 4 matmuls = 2x forward; blocked: recompute, 2.5x).
  return (3 * linear - ctx_kv + attn1 * (1 + self_attn_backward)
          + attn2 * (1 + cross_attn_backward))


@pytest.mark.parametrize("implementation", ["plain", "auto"])
@pytest.mark.parametrize("length", [64, 512])
def test_transformer_flops_match_hand_count(length, implementation):
  # The formula's backward is its four matmuls (2x the forward); the C++ kernel and the
  # blocked path recompute the logits (2.5x). With "auto" on CPU both attentions take
  # the kernel; where it cannot be built 512 x 512 self-attention the blocked loop.
  attention_lib.set_implementation(implementation)
  try:
    backward = lambda queries, keys: (
        2.0 if attention_lib.attention_path(queries, keys) == "formula" else 2.5)
    if implementation == "plain":
      assert backward(512, 512) == backward(64, 1) == 2.0
    elif attention_lib.use_native():
      assert backward(64, 64) == backward(64, 1) == 2.5
    got = _transformer_step_flops(length)
    assert got == _transformer_flops(2, length, 64, 1, 32, backward(length, length),
                                     backward(length, 1))
  finally:
    attention_lib.set_implementation("auto")


def _transformer_step_flops(length: int) -> int:
  rng = np.random.default_rng(0)
  h = rng.standard_normal((2, length, 64), np.float32)
  ctx = rng.standard_normal((2, 1, 32), np.float32)
  return _step_flops(BasicTransformerBlock(2), h, ctx)


def test_flops_of_frozen_weights_have_no_weight_gradient():
  # A two-layer MLP, first layer frozen: forward 2 + 2, backward dW2 + dX2 (to reach
  # nothing trainable below, dX2 is dead and removed) -> 2*4*8*16 + 2*4*16*2 x 2.
  x = jnp.ones((4, 8))
  w1, w2 = jnp.ones((8, 16)), jnp.ones((16, 2))
  loss = lambda w2, w1: jnp.sum((x @ w1) @ w2)
  assert model_flops(jax.value_and_grad(loss), w2, w1) == 2 * 4 * 8 * 16 + 2 * (2 * 4 * 16 * 2)
  both = jax.value_and_grad(loss, argnums=(0, 1))
  # + dX2 (2*4*16*2) + dW1 (2*4*8*16)
  assert model_flops(both, w2, w1) == 2 * (2 * 4 * 8 * 16) + 3 * (2 * 4 * 16 * 2)


def _reference(q, k, v):
  logits = jnp.einsum("nld,nsd->nls", q, k) * q.shape[-1] ** -0.5
  return jnp.einsum("nls,nsd->nld", jax.nn.softmax(logits, axis=-1), v)


def _batched(q, k, v):
  """blocked_attention_batched through the (N, L, D) layout of the other tests, N = 3
  split as batch 1 x 3 heads."""
  return blocked_lib.blocked_attention_batched(q[None], k[None], v[None])[0]


@pytest.mark.parametrize("layout", ["per_head", "batched"])
@pytest.mark.parametrize("length, keys", [(512, 512), (96, 1000), (7, 13), (1024, 1024)])
def test_blocked_attention_matches_softmax_formula(length, keys, layout, monkeypatch):
  fn = blocked_lib.blocked_attention if layout == "per_head" else _batched
  # The batched layout's blocks as small as the per-head one's: (1024, 1024) then runs
  # in 4 query blocks in both (the other shapes in one), and the blocks' outputs and
  # gradients must land in their places.
  monkeypatch.setattr(blocked_lib, "BATCHED_BLOCK_ELEMENTS", blocked_lib.BLOCK_ELEMENTS)
  if length == 1024:
    assert blocked_lib.query_block(length, keys) == 256
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((3, length, 16), np.float32)) * 2.0
  k = jnp.asarray(rng.standard_normal((3, keys, 16), np.float32)) * 2.0
  v = jnp.asarray(rng.standard_normal((3, keys, 16), np.float32))
  g = jnp.asarray(rng.standard_normal((3, length, 16), np.float32))
  out = jax.jit(fn)(q, k, v)
  np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)
  loss = lambda fn: (lambda q, k, v: jnp.vdot(fn(q, k, v), g))
  got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_batched_layout_keeps_a_sharded_batch_local():
  # The accelerator layout loops over heads, never along the batch, so a batch sharded
  # over 4 devices stays sharded through forward and backward; a loop along a sharded
  # axis (the per-head CPU layout, N = batch x heads) makes XLA gather it everywhere.
  mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
  sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32,
                                           sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
  hlo = lambda fn, x: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2),
                                       argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
  assert "all-gather" not in hlo(blocked_lib.blocked_attention_batched, sds((8, 2, 512, 16)))
  assert "all-gather" in hlo(blocked_lib.blocked_attention, sds((16, 512, 16)))


def test_attention_path_follows_implementation_and_target_platform():
  n = 512  # 512 x 512 logits: one block, long enough for the blocked path
  kernel = attention_lib.use_native()  # on this CPU in "auto"
  try:
    for name, platform, long_path, short_path in [
        ("auto", "cpu", "native" if kernel else "blocked", "native" if kernel else "formula"),
        ("auto", "tpu", "formula", "formula"), ("blocked", "tpu", "blocked", "formula"),
        ("splash", "tpu", "splash", "formula"), ("splash", "cpu", "splash", "formula"),
        ("auto", "gpu", "cudnn", "formula"), ("plain", "gpu", "formula", "formula"),
        ("blocked", "gpu", "blocked", "formula"), ("blocked", "cpu", "blocked", "formula"),
        ("plain", "cpu", "formula", "formula")]:
      attention_lib.set_implementation(name, platform)
      assert attention_lib.attention_path(n, n) == long_path, (name, platform)
      # Short attention (8 frames; one context token): the kernel, or else the formula.
      assert attention_lib.attention_path(8, 8) == short_path, (name, platform)
      assert attention_lib.attention_path(1024, 1) == short_path, (name, platform)
    # Splash attention takes lengths in multiples of 128 only: 40 x 15 latent tokens not.
    attention_lib.set_implementation("splash", "tpu")
    assert attention_lib.attention_path(600, 600) == "formula"
  finally:
    attention_lib.set_implementation("auto")
  with pytest.raises(ValueError, match="auto"):
    attention_lib.set_implementation("flash")
  # A GPU program traced on this CPU host (videoldm-compile's proxy) has no cuDNN: given
  # the operands, the "cudnn" path is the formula there.
  assert not attention_lib.cudnn_supports(jnp.bfloat16, 64, 1024, 1024)
  attention_lib.set_implementation("auto", "gpu")
  try:
    assert attention_lib.attention_path(n, n, jnp.bfloat16, 64) == "formula"
    with pytest.raises(ValueError, match="dtype and head dim together"):
      attention_lib.attention_path(n, n, jnp.bfloat16)
    q = jnp.ones((1, n, 128), jnp.bfloat16)
    hlo = jax.jit(lambda q: attention_lib.dot_product_attention(q, q, q, 2)).lower(q).as_text()
    assert "custom_call" not in hlo and "dot_general" in hlo
  finally:
    attention_lib.set_implementation("auto")


def test_each_path_of_dot_product_attention_is_the_formula(monkeypatch):
  # The paths' layouts ((b h) rows on CPU, b h on accelerators, the kernel's b l h d)
  # against "plain", forward and backward; batch 2 x 2 heads tell (b h) from (h b).
  rng = np.random.default_rng(4)
  q, k, v, g = (jnp.asarray(rng.standard_normal((2, 512, 32), np.float32))
                for _ in range(4))
  loss = lambda q, k, v: jnp.vdot(attention_lib.dot_product_attention(q, k, v, 2), g)
  # (traced anew for each implementation: a jitted function keeps its first trace)
  run = lambda *a: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*a)
  before = attention_lib.implementation()
  try:
    attention_lib.set_implementation("plain")
    want = run(q, k, v)
    paths = [("blocked", "cpu", "blocked"), ("blocked", "tpu", "blocked")]
    if attention_lib.use_native():
      paths.append(("auto", "cpu", "native"))
    for name, platform, path in paths:
      attention_lib.set_implementation(name, platform)
      assert attention_lib.attention_path(512, 512) == path
      got = run(q, k, v)
      for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"{name} {platform}")
    # A mask is applied (by the formula, whatever the implementation: the kernels take
    # none): where(mask, logits, -inf) per head, written out in NumPy.
    attention_lib.set_implementation("auto")
    mask = rng.random((2, 512, 512)) < 0.5
    mask[:, :, 0] = True  # every query keeps one key
    out = attention_lib.dot_product_attention(q, k, v, 2, jnp.asarray(mask))
    qh, kh, vh = (np.asarray(x, np.float64).reshape(2, 512, 2, 16) for x in (q, k, v))
    logits = np.einsum("blhd,bshd->bhls", qh, kh) / 4.0
    logits = np.where(mask[:, None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("bhls,bshd->blhd", w / w.sum(-1, keepdims=True), vh).reshape(2, 512, 32)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # Without the C++ kernel (no compiler; VIDEOLDM_JAX_NATIVE=0), long attention on a
    # CPU takes the blocked loop, short the formula.
    monkeypatch.setattr(attention_lib.native_lib, "available", lambda: False)
    assert attention_lib.attention_path(512, 512) == "blocked"
    assert attention_lib.attention_path(8, 8) == "formula"
    with pytest.raises(ValueError, match="keys of batch 3 for queries of batch 2; expected "
                       "the same or 1"):
      attention_lib.dot_product_attention(q, k[:1].repeat(3, 0), v[:1].repeat(3, 0), 2)
    # Splash takes long attention only: 128 x 128 logits stay with the formula.
    attention_lib.set_implementation("splash", "tpu")
    assert attention_lib.attention_path(128, 128) == "formula"
  finally:
    attention_lib.set_implementation(*before)


def test_cudnn_takes_what_its_fused_attention_trains_on(monkeypatch):
  # Its rules, on a stand-in for the first device of an NVIDIA host (this one has none):
  # bf16 / fp16, head dims multiples of 8 up to 128 (256 from compute capability 9.0),
  # even lengths (jax refused to train on SD's 77 context tokens).
  import types
  gpu = lambda capability: types.SimpleNamespace(
      client=types.SimpleNamespace(platform_version="cuda 12.4"),
      compute_capability=capability)
  supports = attention_lib.cudnn_supports
  monkeypatch.setattr(jax, "devices", lambda *a: [gpu("9.0")])
  assert supports(jnp.bfloat16, 64, 1024, 1024) and supports(jnp.float16, 256, 64, 64)
  assert not supports(jnp.bfloat16, 64, 1024, 77) and not supports(jnp.bfloat16, 64, 77, 64)
  assert not supports(jnp.float32, 64, 1024, 1024)
  assert not supports(jnp.bfloat16, 264, 64, 64) and not supports(jnp.bfloat16, 36, 64, 64)
  monkeypatch.setattr(jax, "devices", lambda *a: [gpu("8.0")])
  assert supports(jnp.bfloat16, 128, 64, 64) and not supports(jnp.bfloat16, 256, 64, 64)


def test_cudnn_attention_counts_as_its_matmuls():
  # jax binds cuDNN's fused attention as primitives of these names (jax/_src/cudnn/
  # fused_attention_stablehlo.py); they only lower on a GPU, so stand-ins with the
  # same names and operand shapes give the jaxpr the counter sees there.
  from jax.extend import core as jcore
  from videoldm_jax.train import flops as flops_lib
  b, t, s, n, h = 2, 300, 77, 8, 40
  prims = {}
  for name in ("dot_product_attention_fwd_wrapper", "dot_product_attention_bwd_wrapper"):
    prims[name] = jcore.Primitive(name)
    prims[name].def_abstract_eval(lambda q, k, v: q)
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, s, n, h), jnp.bfloat16)
  for name, matmuls in [("dot_product_attention_fwd_wrapper", 2),
                        ("dot_product_attention_bwd_wrapper", 5)]:
    count = model_flops(lambda q, k, v: prims[name].bind(q, k, v), q, kv, kv)
    # 2 x (B N T S H) per matmul; forward: q k^T, weights v; backward (as torch's
    # FlopCounterMode counts flash attention): logits recomputed, dv, dp, dq, dk.
    assert count == matmuls * 2 * b * n * t * s * h, name
    assert flops_lib.CUDNN_ATTENTION_MATMULS[name] == matmuls


def test_query_block_divides_and_bounds_the_logits():
  assert blocked_lib.query_block(1024, 1024) == 256
  assert blocked_lib.query_block(4096, 77) == 2048     # <= 262144 // 77 = 3404
  assert blocked_lib.query_block(7, 13) == 7
  assert blocked_lib.query_block(97, 2 ** 20) == 1     # a prime length, huge keys
  for length, keys in [(1024, 1024), (4096, 77), (300, 256)]:
    b = blocked_lib.query_block(length, keys)
    assert length % b == 0 and b * keys <= blocked_lib.BLOCK_ELEMENTS


def test_cached_sampling_programs_are_keyed_by_the_attention_implementation():
  # The implementation is read when a program is traced, so a jitted UNet cached for
  # one implementation must not serve another.
  from videoldm_jax.models.unet import UNetConfig
  from videoldm_jax.pipelines import sampling
  config = UNetConfig()
  try:
    auto = sampling.unet_fn(config, None)
    assert sampling.unet_fn(config, None) is auto  # one compilation per config
    attention_lib.set_implementation("plain")
    assert sampling.unet_fn(config, None) is not auto
  finally:
    attention_lib.set_implementation("auto")
  assert sampling.unet_fn(config, None) is auto


def test_compiled_flops_is_nan_where_a_backend_has_no_cost_analysis():
  # jax documents cost_analysis() as possibly raising NotImplementedError or giving
  # nothing: the trainer's log line called it unguarded and would stop the run.
  from videoldm_jax.train import perf

  class Backend:  # stands in for a jax Compiled object of such a backend
    def __init__(self, answer):
      self.answer = answer

    def cost_analysis(self):
      if self.answer is NotImplementedError:
        raise NotImplementedError
      return self.answer
  for answer in (NotImplementedError, [], None):
    assert np.isnan(perf.compiled_flops(Backend(answer)))
  assert perf.compiled_flops(Backend([{"flops": 3.0}])) == 3.0
  assert perf.compiled_flops(jax.jit(lambda a: a @ a).lower(jnp.ones((4, 4))).compile()) > 0


def test_loops_count_each_trip_and_a_cond_its_dearest_branch():
  # A scan runs its body `length` times (gradient accumulation, the temporal loops);
  # a cond runs one branch, so the larger is what a step may cost.
  x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
  one = 2 * 4 * 8 * 8
  scan = lambda x: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=3)[0]
  assert model_flops(scan, x) == 3 * one
  wide = jnp.ones((8, 32))
  cond = lambda p, x: jax.lax.cond(p, lambda x: (x @ w).sum(), lambda x: (x @ wide).sum(), x)
  assert model_flops(cond, True, x) == 4 * one
  # A remat (checkpoint) body and a pjit run once each.
  assert model_flops(jax.checkpoint(lambda x: x @ w), x) == one
  assert model_flops(jax.jit(lambda x: (x @ w) @ w), x) == 2 * one


def test_shard_map_counts_the_shards_its_inputs_are_split_into():
  # x split over "x" only: the two devices along "y" of each row repeat one shard's work,
  # so the model's FLOPs are one matmul of the whole x, not twice that.
  mesh = jax.make_mesh((2, 2), ("x", "y"), devices=jax.devices()[:4])
  w = jnp.ones((8, 8))
  f = jax.shard_map(lambda x: x @ w, mesh=mesh, in_specs=PartitionSpec("x"),
                    out_specs=PartitionSpec("x"))
  x = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, PartitionSpec("x")))
  assert model_flops(f, x) == 2 * 4 * 8 * 8
