"""videoldm-compile: ahead-of-time compilation of a stage's train step for a TPU
topology on this CPU-only machine (libtpu's topology descriptions), with per-device
memory that shrinks as FSDP grows and a FITS / DOES NOT FIT verdict; and splash
attention compiled for a TPU. Every test that compiles for a TPU lives in this file:
libtpu serves one process at a time, and the suite's workers take whole files."""

import json
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from videoldm_jax import compile_check
from videoldm_jax.config_files import load_sibling

pytest.importorskip("libtpu", reason="the [test] extra installs libtpu")
ROOT = Path(__file__).parents[1]


def _tiny(mesh: dict) -> ml_collections.ConfigDict:
  c = load_sibling(str(ROOT / "configs" / "_"), "keyframe_tiny").get_config()
  c.data.update(batch_size=4, num_frames=2, height=16, width=16)
  # One UNet level, one ResBlock: TPU compile time grows with the number of ops.
  c.random_image_model.unet.update(block_out_channels=(32,), attention_levels=(True,),
                                   layers_per_block=1)
  c.mesh = mesh
  return c


def _attention_level(attention: str) -> compile_check.FitReport:
  """The tiny step with 16 x 16 = 256 latent tokens at the attention level (which
  attention="splash" gives Pallas' kernel: a shard_map over the 4-way FSDP batch),
  compiled for a v5e 2x2 at a TPU host's matmul precision (the tests': highest). A
  one-level VAE (no downsampling) encodes 16 x 16 frames to those latents: the step
  still runs the VAE encoder and the text encoder, and compiles in 56 CPU s where the
  tiny config's f4 VAE on 64 x 64 frames took 81 (TPU compile time grows with the ops
  and their sizes)."""
  c = _tiny(dict(data=1, fsdp=4, tensor=1))
  c.random_image_model.vae.block_out_channels = (32,)
  c.train.attention = attention
  with jax.default_matmul_precision("default"):
    return compile_check.fit_report(c, "v5e:2x2")


@pytest.fixture(scope="module")
def fsdp_report():
  # (Also the plain-attention side of the splash test: one TPU compile fewer.)
  return _attention_level("plain")


def test_tiny_keyframe_step_fits_a_v5e_2x2_and_fsdp_shards_it(fsdp_report):
  r = fsdp_report
  assert r.devices == 4 and r.device_memory_bytes == 16 * compile_check.GiB
  assert r.verdict() == "FITS" and r.flops_per_device > 0
  assert r.trainable_params < r.params
  assert "per device" in r.summary()
  # Replicated, every device would hold the whole train state: f32 theta + phi, and
  # Adam's two moments and the EMA of phi (3 more copies of phi). Sharded 4 ways over
  # FSDP the large leaves shrink 4x; this model is tiny, so biases and norms (which do
  # not divide and stay replicated) weigh a lot: measured 0.65 of the replicated size.
  replicated = 4 * (r.params + 3 * r.trainable_params)
  assert r.argument_bytes < 0.7 * replicated
  # The donated state is reused for the outputs (aliased): counted once in the peak.
  assert r.alias_bytes > 0.5 * r.argument_bytes
  assert r.peak_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes


def test_memory_per_device_is_the_chips_hbm_over_its_devices():
  # A v4 chip's two TensorCores are one JAX device on a TPU VM (megacore), with the
  # chip's 32 GiB (libtpu's default description split them: 8 devices of 16 GiB here,
  # twice the devices training sees); a v5e chip is one device with its 16 GiB.
  devices, memory = compile_check.topology_devices("v4:2x2x1")
  assert len(devices) == 4 and memory == 32 * compile_check.GiB
  devices, memory = compile_check.topology_devices("v5e:2x2")
  assert len(devices) == 4 and memory == 16 * compile_check.GiB


def test_verdict_from_peak_against_device_memory():
  r = compile_check.FitReport(
      stage="s", topology="t", devices=1, mesh={}, params=1, trainable_params=1,
      argument_bytes=10, output_bytes=5, alias_bytes=5, temp_bytes=80, peak_bytes=90,
      device_memory_bytes=100, flops_per_device=1.0, compile_s=0.0)
  assert r.verdict() == "FITS"
  r.peak_bytes = 95  # exactly the 95% headroom still fits ...
  assert r.verdict() == "FITS"
  r.peak_bytes = 95.5  # ... past it does not
  assert r.verdict() == "DOES NOT FIT" and r.to_json()["fits"] is False
  r.devices, r.flops_per_device = 4, 2.5  # the step's FLOPs: every device's share
  assert r.to_json()["flops_per_step"] == 10.0


def test_unknown_topology_and_indivisible_batch_are_clear_errors():
  with pytest.raises(ValueError, match="v5p:4x4x4"):
    compile_check.topology_devices("tpu-big")
  for bad in ("cpu:0", "cpu:-1", "h100:two"):  # an IndexError, a bare int() error, 3 devices
    with pytest.raises(ValueError, match="needs a device count N >= 1"):
      compile_check.topology_devices(bad)
  c = _tiny(dict(data=4, fsdp=1, tensor=1))
  c.data.batch_size = 6
  with pytest.raises(ValueError, match="does not split"):
    compile_check.fit_report(c, "v5e:2x2")


def test_out_of_memory_compile_is_a_does_not_fit_verdict():
  # The first line of libtpu's error for the SD 1.5 v5e-64 config (bench/compile_fit.py,
  # 2026-11-25): XLA's memory assignment refuses the program instead of compiling it.
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
         "HLO temporaries (24.02G) exceeds available HBM (15.75G).")
  assert compile_check.required_temp_bytes(msg) == int(24.02 * compile_check.GiB)
  assert compile_check.required_temp_bytes("RESOURCE_EXHAUSTED: something else") == -1
  # Binary units, as XLA prints them: 512.50M is 512.5 MiB.
  assert compile_check.required_temp_bytes(
      "HLO temporaries (512.50M) exceeds available") == int(512.5 * 2 ** 20)
  r = compile_check.FitReport(
      stage="s", topology="v5e:8x8", devices=64, mesh={}, params=1, trainable_params=1,
      argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0, peak_bytes=0,
      device_memory_bytes=16 * compile_check.GiB, flops_per_device=float("nan"),
      compile_s=0.0, compile_error=msg)
  assert r.verdict() == "DOES NOT FIT" and "24.02G" in r.summary()
  assert "FLOPs per step: not counted (no program); compiled in 0s" in r.summary()
  # The rest of the compiler's message (e.g. a list of the largest allocations) is shown
  # under the verdict, cut to MESSAGE_LINES lines; the JSON keeps all of it.
  details = [f"  {i}. Size: 1.00G" for i in range(compile_check.MESSAGE_LINES + 5)]
  r.compile_message = "\n".join([msg] + details)
  text = r.summary()
  assert "  1. Size: 1.00G" in text and f"  {compile_check.MESSAGE_LINES}. Size" not in text
  assert "(5 more lines in the JSON report)" in text
  assert r.to_json()["compile_message"] == r.compile_message
  # Strict JSON: the FLOPs an out-of-memory compile never counted are null, not NaN.
  line = json.dumps(r.to_json())
  assert json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))[
      "flops_per_device"] is None
  # A message without the figure: temporaries unknown, not -1 bytes.
  r.temp_bytes = -1
  assert "temporaries unknown," in r.summary()


def test_latent_cache_batch_compiles_the_step_without_the_encoders_gpu_proxy():
  # A cache (videoldm-cache-latents) holds scaled latents and caption embeddings, so the
  # step that trains from it runs neither the VAE encoder nor the text encoder.
  from videoldm_jax.stages import base
  from videoldm_jax.train.loop import stage_setup
  c = _tiny(dict(data=1, fsdp=4, tensor=1))
  c.data.kind = "latent_cache"
  with tempfile.TemporaryDirectory() as tmp, base.abstract_setup():
    setup = stage_setup(c, Path(tmp))
    batch = compile_check._abstract_batch(setup, c)
  ldm = setup.extra["ldm"]
  f = ldm.vae_config.downsample_factor
  assert set(batch) == {"latents", "context"}
  assert batch["latents"].shape == (4, 2, 16 // f, 16 // f, ldm.vae_config.latent_channels)
  text = ldm.text_config
  assert batch["context"].shape == (4, text.max_position_embeddings, text.hidden_size)
  c.data.width = 32  # (height, width) in that order
  with tempfile.TemporaryDirectory() as tmp, base.abstract_setup():
    wide = compile_check._abstract_batch(stage_setup(c, Path(tmp)), c)
  assert wide["latents"].shape[2:4] == (16 // f, 32 // f)
  c.data.width = 16
  # Compiled as the GPU proxy (4 CPU devices, traced for GPUs, an H100's memory): the
  # verdict is against the card's memory and says it is a proxy. The attention setting
  # resolves as on a GPU host while tracing, and is restored after.
  from videoldm_jax.models import attention
  before, platforms = attention.implementation(), []
  set_implementation = attention.set_implementation

  def spy(*args, **kwargs):
    platforms.append(kwargs.get("platform"))
    return set_implementation(*args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(attention, "set_implementation", spy)
    r = compile_check.fit_report(c, "h100:4")
  assert platforms[0] == "gpu" and attention.implementation() == before
  assert r.devices == 4 and r.flops_per_device > 0
  assert r.device_memory_bytes == compile_check.GPU_MEMORY["h100"] and r.fits is True
  assert "proxy" in r.summary()
  # XLA's memory assignment refusing the program: a DOES NOT FIT report, not a crash.
  def out_of_memory(self):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. the total memory "
        "required for HLO temporaries (2.50G) exceeds available\nmore detail")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax.stages.Lowered, "compile", out_of_memory)
    oom = compile_check.fit_report(c, "h100:4")
  assert oom.fits is False and oom.verdict() == "DOES NOT FIT"
  assert oom.temp_bytes == int(2.5 * compile_check.GiB)
  assert oom.peak_bytes == oom.argument_bytes + oom.temp_bytes and oom.argument_bytes > 0
  assert oom.to_json()["flops_per_device"] is None
  assert oom.compile_error.startswith("RESOURCE_EXHAUSTED") and "more detail" not in \
      oom.compile_error
  # Any other compiler error is raised as such, not reported as a step that does not fit.
  def crash(self):
    raise jax.errors.JaxRuntimeError("INTERNAL: Mosaic failed")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax.stages.Lowered, "compile", crash)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: Mosaic failed"):
      compile_check.fit_report(c, "h100:4")
  # A CPU topology is traced for CPUs, and the batch is split over config.batch_axes as
  # the trainer splits it (seen where the step is built; nothing compiled).
  class Seen(Exception):
    pass

  def build(*args, batch_sharding, **kwargs):
    raise Seen(attention.implementation()[1], batch_sharding)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(compile_check.step_lib, "build_train_step", build)
    with pytest.raises(Seen) as seen:
      compile_check.fit_report(c, "cpu:4")
  platform, batch_sharding = seen.value.args
  assert platform == "cpu"
  assert batch_sharding.spec == jax.sharding.PartitionSpec(tuple(c.batch_axes))
  c.data.height = 17  # not a multiple of the VAE's factor: named, not a shape error
  with pytest.raises(ValueError, match=r"config.data.height and width must be multiples "
                     r"of \d+ .* got 17x16"):
    compile_check.fit_report(c, "h100:4")


def test_abstract_batch_has_the_fields_of_the_trainers_batches():
  # With image_fraction > 0 the trainer's batches carry each frame's caption tokens and
  # a class-conditional model's per-frame labels; the compiled step lacked them (another
  # program than the one trained: B captions encoded, not B*T).
  from videoldm_jax.data.grain_pipeline import make_video_dataset
  from videoldm_jax.stages import base
  from videoldm_jax.train.loop import stage_setup
  c = _tiny(dict(data=1, fsdp=4, tensor=1))
  c.random_image_model.unet.num_class_embeds = 3
  c.data.image_fraction = 0.5
  with tempfile.TemporaryDirectory() as tmp, base.abstract_setup():
    setup = stage_setup(c, Path(tmp))
    batch = compile_check._abstract_batch(setup, c)
  source = [{"video": np.zeros((3, 16, 16, 3), np.uint8), "caption": f"clip {i}",
             "label": i % 3} for i in range(6)]
  real = setup.make_batch(next(iter(make_video_dataset(
      source, batch_size=4, num_frames=2, height=16, width=16, process_index=0,
      process_count=1, image_fraction=0.5, seed=0))))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (np.shape(v), np.asarray(v).dtype) for k, v in real.items()}
  assert batch["frame_tokens"].shape[:2] == (4, 2) and batch["frame_labels"].shape == (4, 2)
  assert batch["image_only"].shape == (4, 2)


def test_tiny_step_compiles_splash_attention_for_a_tpu(fsdp_report):
  # Compiled: Mosaic accepts the kernel inside the train step. XLA's FLOP count leaves
  # custom calls out, so the level's self-attention matmuls leave it too.
  reports = {"splash": _attention_level("splash"), "plain": fsdp_report}
  assert reports["splash"].verdict() == reports["plain"].verdict() == "FITS"
  assert reports["splash"].flops_per_device < reports["plain"].flops_per_device, reports


def test_splash_compiles_for_a_tpu_in_a_tenth_of_the_formulas_memory():
  from bench import splash_attention as bench
  level, tokens, head_dim = bench.LEVELS[0]  # SD 1.5 level 0: 2560 tokens, head dim 40
  got = {impl: bench.measure("v5e:2x2", 4, level, tokens, head_dim, impl)
         for impl in ("splash", "plain")}
  assert got["splash"]["path"] == "splash" and got["plain"]["path"] == "formula"
  assert got["splash"]["all_gathers"] == 0  # each device attends over its own frames
  assert (got["splash"]["temp_bytes_per_device"]
          < got["plain"]["temp_bytes_per_device"] / 10), got


def test_abstract_setup_checks_a_video_exports_layers_as_training_does(tmp_path):
  # The abstract image model left out a video export's temporal layers and video
  # decoder: videoldm-compile reported on configs that training refuses at setup.
  from videoldm_jax import pretrained
  from videoldm_jax.models.temporal import TemporalConfig
  from videoldm_jax.models.vae import VAETemporalConfig
  from videoldm_jax.stages import base
  from videoldm_jax.train.loop import stage_setup
  c = _tiny(dict(data=1, fsdp=1, tensor=1))
  r = c.random_image_model
  folder = tmp_path / "export"
  folder.mkdir()
  # What the abstract setup reads of an export: its index (params are never read).
  (folder / "model_index.json").write_text(json.dumps({
      "format": pretrained.FORMAT, "format_version": pretrained.FORMAT_VERSION,
      "unet": dict(r.unet), "vae": dict(r.vae), "text_encoder": dict(r.text_encoder),
      "scheduler": dict(r.scheduler), "temporal": TemporalConfig().to_dict(),
      "vae_temporal": VAETemporalConfig().to_dict()}))
  c.image_model = str(folder)
  c.temporal.conv_kernel = (3, 3, 3)  # the export's layers are (3, 1, 1)
  with base.abstract_setup(), pytest.raises(ValueError, match=r"(?s)does not fit the model.*"
                                            r"temporal_resnets_0/conv1/kernel"):
    stage_setup(c, tmp_path / "keyframe")
  c.temporal.conv_kernel = (3, 1, 1)
  with base.abstract_setup():
    stage_setup(c, tmp_path / "keyframe")
  d = load_sibling(str(ROOT / "configs" / "_"), "decoder_tiny").get_config()
  d.image_model = str(folder)
  d.vae_temporal.conv_kernel = (3, 3, 3)
  with base.abstract_setup(), pytest.raises(ValueError, match="holds a video decoder with "
                                            "vae_temporal"):
    stage_setup(d, tmp_path / "decoder")
