"""bench/ab_step.py: the interleaving alternates which variant goes first and times each
variant's own calls; every variant switch is undone when its step has been traced.
bench/side_by_side.py reports a worker's failure with the side's name; bench/attention.py
counts FLOPs as torch's FlopCounterMode does and runs both sides in side_by_side's
workers."""

import jax
import pytest

from bench import ab_step, side_by_side
from bench import attention as attention_bench
from bench import conv as conv_bench
from videoldm_jax.models import attention, conv, matmul
from videoldm_jax.native import build


def test_interleaved_times_alternate_and_time_each_variant():
  import time
  calls = []
  run_a = lambda: calls.append("a")
  run_b = lambda: (calls.append("b"), time.sleep(0.01))  # B is the slow one
  times_a, times_b = ab_step.interleaved_times(run_a, run_b, rounds=3, steps=2)
  assert calls == list("aabb" "bbaa" "aabb")
  assert len(times_a) == len(times_b) == 3
  # Each variant's own times, also in the rounds where B goes first.
  assert all(t >= 0 for t in times_a) and min(times_b) > max(times_a)


def test_summary_ratios_are_per_round():
  # Rounds of 1, 2 and 4 s for A (the machine drifting), B 10% slower in each: the
  # per-round ratios are all 1.1, although B's median (2.2) / A's median (2) is too
  # and A's mean (7/3) is not; the FLOP ratio stands beside them.
  s = ab_step.summary([1.0, 2.0, 4.0], [1.1, 2.2, 4.4], gflop_a=30.0, gflop_b=20.0)
  assert s["a_step_s"] == 2.0 and s["b_step_s"] == pytest.approx(2.2)
  assert s["b_over_a"] == pytest.approx(1.1) and s["flops_b_over_a"] == pytest.approx(2 / 3)
  # One disturbed round of B: ratios 3.0, 1.1, 1.1, median 1.1 (min 1.1, max 3.0); the
  # ratio of the medians would say 3.0 / 2.0 = 1.5.
  s = ab_step.summary([1.0, 2.0, 4.0], [3.0, 2.2, 4.4], 1.0, 1.0)
  assert s["b_over_a"] == pytest.approx(1.1) and s["b_step_s"] == 3.0
  assert (s["b_over_a_min"], s["b_over_a_max"]) == (pytest.approx(1.1), 3.0)
  assert s["a_round_s"] == [1.0, 2.0, 4.0] and s["b_round_s"] == [3.0, 2.2, 4.4]


def test_variants_restore_what_they_switch():
  from videoldm_jax.models import layers
  # Everything a variant may switch: the attention choice, the patched module
  # attributes and XLA's compile (the flag variants patch Lowered.compile).
  state = lambda: (attention.implementation(), dict(matmul.WEIGHT_GRADS),
                   attention.NATIVE_MIN_LOGITS, conv.USE_NATIVE_CONV, matmul.USE_KERNEL,
                   attention.gated_gelu, layers.GroupNorm, layers.layer_norm,
                   layers.fusion_boundary, conv.conv_general_dilated,
                   jax.stages.Lowered.compile)
  before = state()
  for name, variant in ab_step.VARIANTS.items():
    with variant():
      # Every variant but the default switches something.
      assert (state() == before) == (name == "default"), name
      if name == "attention=plain":
        assert attention.implementation()[0] == "plain"
      if name == "ffn_weight_grad=transposed":
        assert matmul.WEIGHT_GRADS["chunked"] is matmul.dense_matmul
      if name == "attention=kernel_long_only":
        assert attention.attention_path(8, 8) == "formula"
      if name == "ynn=individual_dot":
        assert "__ynn_fusion" not in _compiled_row_sums()
      if name == "conv=xla":
        assert not conv.USE_NATIVE_CONV
    assert state() == before, name
  # Outside the variant, XLA's default (the package's XLA_FLAGS) gives the row sums to
  # YNNPACK: the variant switched something that was on.
  assert "__ynn_fusion" in _compiled_row_sums()


def _compiled_row_sums() -> str:
  import jax
  import jax.numpy as jnp
  x = jnp.ones((256, 512))
  return jax.jit(lambda x: (x * x).sum(axis=1)).lower(x).compile().as_text()


def test_before_round_runs_untimed_before_each_round():
  calls = []
  ab_step.interleaved_times(lambda: calls.append("a"), lambda: calls.append("b"), rounds=2,
                            steps=1, before_round=lambda r: calls.append(f"r{r}"))
  assert calls == ["r0", "a", "b", "r1", "b", "a"]


def test_side_by_side_names_the_side_whose_worker_failed():
  with pytest.raises(RuntimeError, match="the torch worker failed: KeyError: 'W9'"):
    side_by_side.Side("torch", "W9", "temporal", warmup=0)


def test_attention_flops_match_torch_flop_counter():
  torch = pytest.importorskip("torch")
  from bench import peer_torch
  n, h, length, d = 2, 2, 64, 16
  q, k, v = (torch.randn(n, h, length, d, requires_grad=True) for _ in range(3))
  with peer_torch.flop_counter() as forward_only:
    with torch.no_grad():
      torch.nn.functional.scaled_dot_product_attention(q, k, v)
  with peer_torch.flop_counter() as both:
    torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
  # 4 L S D per sequence and head = 4 * 2 * 2 * 64 * 64 * 16 = 1 048 576 forward.
  assert attention_bench.attention_flops(n, h, length, d, backward=False) == 1_048_576
  assert forward_only.get_total_flops() == 1_048_576
  # The backward's five matmuls add 2.5 times the forward: 3.5 * 1 048 576.
  assert both.get_total_flops() == 3_670_016
  assert attention_bench.attention_flops(n, h, length, d, backward=True) == 3_670_016


def test_attention_bench_sides_run():
  pytest.importorskip("torch")
  # torch's side in this process (torch is imported already); ours in a worker, the way
  # bench.attention runs it (a builder passed to side_by_side.Side).
  step, peak, info = attention_bench.build("torch", "W1-temporal", "forward+backward")
  assert step() is None and peak is None and info["threads"] >= 1
  worker = side_by_side.Side("ours", "W1-temporal", "forward", warmup=1,
                             build=attention_bench.build)
  try:
    # 8 frames: the kernel where this machine builds it, else too short to block.
    assert worker.info["implementation"] == attention.attention_path(8, 8)
    assert worker.info["implementation"] in ("native", "formula")
    assert worker.request("step") is None
    assert worker.request("peak") is None
  finally:
    worker.close()


# Skipped only where nothing can be built (as tests/test_native_matmul.py); with a
# compiler, a failed build fails here.
@pytest.mark.skipif(build.unbuildable_reason() is not None,
                    reason=f"no kernel here: {build.unbuildable_reason()}")
@pytest.mark.parametrize("pass_", conv_bench.PASSES)
def test_conv_bench_sides_run_and_agree(pass_):
  # build() compares the kernel's result with XLA's (1e-4) before timing anything.
  run_xla, run_kernel, gflop = conv_bench.build("W2-l2", pass_)
  run_xla(), run_kernel()
  assert gflop == 2 * 8 * 8 * 8 * 9 * 256 * 256 / 1e9


def test_torch_peer_and_decoder_case_run_what_they_report(monkeypatch):
  # The torch peer ran SD15's 40 x 64 latents as 40 x 40 (its speed-up and MFU off by
  # ~1.6x), and the decoder case ignored --remat while its JSON line reported it.
  import dataclasses
  from bench import peer_torch, workloads
  from videoldm_jax.train import flops
  # W1's first level only (its spatial attention kept): the width reaches the peer or not
  # whatever the depth, and each level costs seconds of FlopCounterMode and tracing.
  w1 = _first_level(workloads.WORKLOADS["W1"])
  square = dataclasses.replace(w1, name="sq", batch=1, frames=2, latent_size=8)
  wide = dataclasses.replace(square, name="wide", latent_width=16)
  monkeypatch.setitem(workloads.WORKLOADS, "sq", square)
  monkeypatch.setitem(workloads.WORKLOADS, "wide", wide)
  gflop = {n: peer_torch.build(n, "temporal")[1]["model_gflop"] for n in ("sq", "wide")}
  # Twice the latent pixels: every convolution and projection twice, the spatial
  # attention's logits four times; so between 2x and 4x.
  assert 2.0 <= gflop["wide"] / gflop["sq"] < 4.0, gflop
  monkeypatch.setitem(workloads.WORKLOADS, "dec", dataclasses.replace(
      square, name="dec", latent_size=4))
  from bench.train_step import sharded_state
  from videoldm_jax import sharding
  from videoldm_jax.train import step as step_lib
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  count = {}
  for remat in ("none", "full"):
    case = workloads.build("dec", "decoder", "full", dtype="float32", remat=remat)
    tx, state, _ = sharded_state(case, mesh)
    step = step_lib.build_train_step(case.stage, tx, seed=0)
    count[remat] = flops.model_flops(step, state, case.batch)  # traced, not compiled
  # Full remat recomputes the forward in the backward pass: more FLOPs counted.
  assert count["full"] > count["none"], count


def test_bench_counts_that_would_time_nothing_are_refused():
  # 0 timed runs printed NaN figures (bench/sample.py); 0 rounds failed on an empty list
  # after both sides had compiled.
  import os
  import re
  import subprocess
  import sys
  from pathlib import Path
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cases = (("sample", "--runs=0", "--runs must be >= 1, got 0"),
           ("side_by_side", "--rounds=0", "--rounds must be >= 1, got 0"),
           ("ab_step", "--warmup=-1", "--warmup must be >= 0, got -1"),
           ("train_step", "--steps=4", "--steps must be >= 5"),
           # 0 rounds / steps / batches failed on an empty list or divided by zero after
           # the compiles (conv, attention, profile_step), the dataset's build
           # (data_throughput) or printed NaN (stop_check)
           ("conv", "--rounds=0", "--rounds must be >= 1, got 0"),
           ("attention", "--steps=0", "--steps must be >= 1, got 0"),
           ("profile_step", "--steps=0", "--steps must be >= 1, got 0"),
           ("data_throughput", "--batches=0", "--batches must be >= 1, got 0"),
           ("stop_check", "--rounds=0", "--rounds must be >= 1, got 0"),
           # a misspelt flag ran stop_check's defaults (parse_known_args)
           ("stop_check", "--inputms=5", "unrecognized arguments: --inputms=5"),
           # unknown names: a KeyError after the matmul peak (sample), after the kernels'
           # check (conv), or nothing run and exit status 0 (compile_fit)
           ("sample", "--workload=W3", "--workload: unknown 'W3'; known: W1, W2, SD15"),
           ("bf16_check", "--workload=W1,W9", "--workload: unknown 'W9'"),
           ("conv", "--case=W9-l0", "--case: unknown 'W9-l0'"),
           ("compile_fit", "--only=v5e46", "--only: unknown 'v5e46'"),
           ("ab_step", "--b=weight_grad=xla+bogus", "--b: unknown 'bogus'"))
  # Each script as `python -m bench.NAME FLAG` runs it (runpy, as "__main__"), all of them
  # in one interpreter: a process per script spent ~2 s of CPU each on its imports alone.
  program = ("import runpy, sys, warnings\n"
             # (a script another one imported already: runpy says so, and runs it afresh)
             "warnings.filterwarnings('ignore', '.*found in sys.modules', RuntimeWarning)\n"
             f"for i, (script, flag) in enumerate("
             f"{[(script, flag) for script, flag, _ in cases]!r}):\n"
             "  sys.argv = ['-m', flag]\n"
             "  try:\n"
             "    runpy.run_module(f'bench.{script}', run_name='__main__', alter_sys=True)\n"
             "    code = 'none'\n"
             "  except SystemExit as e:\n"
             "    code = e.code\n"
             "  print(f'=== {i} exited {code}', file=sys.stderr, flush=True)\n")
  proc = subprocess.run([sys.executable, "-c", program], cwd=Path(__file__).parents[1],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Each case's stderr, then its line "=== INDEX exited CODE".
  parts = re.split(r"=== (\d+) exited (\S+)\n", proc.stderr)
  exits = {int(i): (code, stderr) for stderr, i, code in zip(*[iter(parts)] * 3)}
  for i, (script, flag, said) in enumerate(cases):
    code, stderr = exits.get(i, (None, ""))
    assert code == "2" and said in stderr, (script, flag, proc.stderr[-1000:])


def test_peer_torch_refuses_what_train_step_refuses(monkeypatch):
  # --steps=0 failed on an empty list after the SVD UNet and its FLOP count were built
  # (train_step, which it is timed as, refuses fewer than 5); a misspelt mode ran
  # 'temporal' silently.
  pytest.importorskip("torch")
  import sys
  from bench import peer_torch
  monkeypatch.setattr(peer_torch, "run", lambda *a: pytest.fail("ran"))
  for flag in ("--steps=0", "--warmup=-1", "--workload=W9", "--mode=ful"):
    monkeypatch.setattr(sys, "argv", ["peer_torch", flag])
    with pytest.raises(SystemExit) as e:
      peer_torch.main()
    assert e.value.code == 2, flag


def _first_level(w):
  """Workload `w` with its UNet cut to its first level."""
  import dataclasses
  unet = dataclasses.replace(w.unet, block_out_channels=w.unet.block_out_channels[:1],
                             attention_levels=w.unet.attention_levels[:1],
                             num_heads=w.unet.num_heads[:1])
  return dataclasses.replace(w, unet=unet)


def _tiny_workload_ticking(monkeypatch, module) -> str:
  """Registers workload "t" (W1 cut to its first level without its attention, at batch
  1, 2 frames of 8 x 8 latents) and makes `module`'s clock tick 0.5 s per call; returns
  the workload's name."""
  import dataclasses
  import itertools
  from bench import workloads
  # One level, its spatial attention left out (the middle block keeps one): compile time
  # grows with the op count (the two train steps took 45 s of CPU with it, 32 s without),
  # and what the tests check is the benchmarks' arithmetic, not W1's shapes.
  w1 = _first_level(workloads.WORKLOADS["W1"])
  unet = dataclasses.replace(w1.unet, attention_levels=(False,))
  tiny = dataclasses.replace(w1, name="t", unet=unet, batch=1, frames=2, latent_size=8)
  monkeypatch.setitem(workloads.WORKLOADS, "t", tiny)
  clock = itertools.count()
  monkeypatch.setattr(module.time, "perf_counter", lambda: 0.5 * next(clock))
  return "t"


def test_train_step_record_is_its_arithmetic(monkeypatch):
  # With a clock that ticks 0.5 s per call: step_s 0.5 (the median of the timed steps,
  # each blocked on), samples/s = batch / 0.5, MFU = model FLOPs / 0.5 / peak; temporal
  # mode trains fewer parameters than the model has, full all of the UNet's.
  from bench import train_step
  _tiny_workload_ticking(monkeypatch, train_step)
  blocked = []
  block = jax.block_until_ready
  monkeypatch.setattr(train_step.jax, "block_until_ready",
                      lambda x: blocked.append(1) or block(x))
  records = {}
  for mode in ("temporal", "full"):
    blocked.clear()
    r = train_step.run("t", "keyframe", mode, dtype="float32", remat="none", steps=5,
                       warmup=0, peak=1e9, batch=2)
    assert len(blocked) == 5 + 1  # every timed step, plus once after the warm-up
    assert (r["step_s"], r["samples_per_s"], r["batch"]) == (0.5, 4.0, 2)
    assert r["mfu"] == pytest.approx(r["model_gflop"] * 1e9 / 0.5 / 1e9)
    assert r["mfu_xla"] == pytest.approx(r["xla_gflop"] * 1e9 / 0.5 / 1e9)
    assert r["temp_bytes"] > 0 and r["argument_bytes"] > 0
    records[mode] = r
  assert records["temporal"]["trainable_params"] < records["temporal"]["params"]
  assert records["temporal"]["trainable_params"] < records["full"]["trainable_params"]
  # No weight gradients for the frozen image layers: fewer FLOPs, by the model's count
  # and by XLA's.
  for count in ("model_gflop", "xla_gflop"):
    assert records["temporal"][count] < records["full"][count]


def test_bench_helpers_by_hand(monkeypatch):
  import argparse
  import itertools
  from bench import common, sharding as sharding_bench, workloads
  from videoldm_jax import sharding
  # time_fn: the median of the timed calls (uneven: 1, 1, 10 -> 1, not the mean 4).
  ticks = itertools.accumulate(itertools.cycle([0, 1, 0, 1, 0, 10]))
  monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
  assert common.time_fn(lambda: None, warmup=0, steps=3) == 1.0
  monkeypatch.undo()
  # Peak RSS in bytes (Linux reports KiB): near the kernel's high-water mark.
  with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024
  assert 0.9 * hwm <= common.peak_host_rss_bytes() <= 1.1 * hwm
  # refuse_below: the least value itself is fine.
  common.refuse_below(argparse.ArgumentParser(), argparse.Namespace(runs=1), runs=1)
  # Per-device bytes: a (8, 4) float32 array split 2 ways and a replicated (3,) one.
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  shardings = [jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(p))
               for p in ("fsdp", None)]
  tree = [jax.ShapeDtypeStruct((8, 4), "float32"), jax.ShapeDtypeStruct((3,), "float32")]
  assert sharding_bench.per_device_bytes(tree, shardings) == (4 * 4 * 4 + 3 * 4,
                                                              8 * 4 * 4 + 3 * 4)
  # Workloads: --batch sets the samples; W2 as issue 8 states it.
  assert workloads.build("W1", "keyframe", "temporal", batch=3).samples == 3
  w1, w2 = workloads.WORKLOADS["W1"].unet, workloads.WORKLOADS["W2"].unet
  assert (w1.block_out_channels, w1.layers_per_block, w1.attention_levels, w1.num_heads,
          w1.cross_attention_dim) == ((64, 128), 1, (True, False), (2, 4), 64)
  assert (w2.block_out_channels, w2.layers_per_block, w2.attention_levels, w2.num_heads,
          w2.cross_attention_dim) == ((128, 256, 256), 2, (True, True, False), (4, 8, 8), 128)


def test_sample_bench_counts_both_guidance_branches(monkeypatch):
  # A guided step is one UNet call on 2B (the unconditional half too): twice the FLOPs of
  # an unguided one; MFU = FLOPs per step / seconds per step / peak, the clock ticking
  # 0.5 s per call (so a run of 2 steps takes 0.5 s: 0.25 s a step).
  from bench import sample
  _tiny_workload_ticking(monkeypatch, sample)
  guided, plain = (sample.ddim("t", steps=2, runs=1, guidance=g, peak=1e9)
                   for g in (7.5, 1.0))
  # (Within 1%: not every op of a call scales with its batch.)
  assert guided["model_gflop_per_step"] == pytest.approx(2 * plain["model_gflop_per_step"],
                                                         rel=0.01)
  assert (guided["s_per_step"], guided["frames_per_s"]) == (0.25, 4.0)
  assert guided["mfu"] == pytest.approx(guided["model_gflop_per_step"] / 0.25)


def test_gpu_run_refuses_an_unknown_case_before_anything_runs(tmp_path):
  # A misspelt CASES name ran no case and exited 0, a GPU loan spent on starting the
  # machine; its list of names is the script's own cases, in their order.
  import re
  import subprocess
  import sys
  from pathlib import Path
  root = Path(__file__).parents[1]
  script = root / "bench" / "gpu_run.sh"
  env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
         "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu",
         "CASES": "sd15_temporal_atuo"}
  proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "unknown case 'sd15_temporal_atuo'" in proc.stderr
  assert not (tmp_path / "out").exists()  # refused before anything ran or was written
  text = script.read_text()
  known = re.search(r'KNOWN_CASES="([^"]*)"', text).group(1).split()
  assert known == re.findall(r"^run_case (\w+) ", text, re.M)


def test_ffn_weight_grad_variant_changes_the_program_it_is_run_against():
  # Where the C++ kernel runs it takes every dense dW, chunked or not: the README's
  # `--a=ffn_weight_grad=transposed --b=default` compiled one program twice. Joined with
  # weight_grad=xla (the README's command now) it changes the feed-forward's dW.
  from videoldm_jax.models import native_matmul
  x, w = jax.numpy.ones((2048, 256)), jax.numpy.ones((256, 128))  # (several row chunks)
  dense = (((1,), (0,)), ((), ()))

  def program(spec):
    with ab_step.variant(spec):
      return jax.jit(jax.grad(lambda w: matmul.dense_dot_general_chunked(
          x, w, dense).sum())).lower(w).as_text()

  before = dict(matmul.WEIGHT_GRADS), matmul.USE_KERNEL
  assert program("weight_grad=xla+ffn_weight_grad=transposed") != program("weight_grad=xla")
  assert (dict(matmul.WEIGHT_GRADS), matmul.USE_KERNEL) == before  # both undone
  if native_matmul.available():
    assert program("ffn_weight_grad=transposed") == program("default")
  with pytest.raises(KeyError):
    program("weight_grad=xla+bogus")
