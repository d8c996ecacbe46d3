"""End to end: a tiny diffusers StableDiffusionPipeline -> videoldm-convert -> sampling.

The pipeline (UNet, VAE, CLIP text encoder, tokenizer, DDIM scheduler) is built with
every weight perturbed and saved with `save_pretrained` (safetensors). The tests run the
real console scripts, check that the diffusers-folder and the single-file routes give
bit-identical parameters, and that whole text-to-image sampling (prompt encoding, CFG,
DDIM / DPM-Solver++ loop, VAE decode) matches diffusers' pipeline from the same noise.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from tests import ldm_export
from tests.conftest import max_rel_err, perturb_all_weights
from videoldm_jax import pretrained
from videoldm_jax.convert import pipeline_import
from videoldm_jax.convert.safetensors_io import PickleRefused, load_safetensors
from videoldm_jax.models.tokenizer import CLIPTokenizer, write_byte_level_tokenizer
from videoldm_jax.pipelines import sampling

ROOT = Path(__file__).parents[1]
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
           norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2)
TEXT = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            eos_token_id=513)
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False)


# The console scripts' environment: no more than they need, and the session's compilation
# cache (tests/conftest.py), so that a run compiling what an earlier one did loads it: the
# second 16 x 16 sample_image run below took 8.9 s of CPU without it, 3.8 s with it.
CLI_ENV = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           **{k: os.environ[k] for k in ("JAX_COMPILATION_CACHE_DIR",
                                         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
              if k in os.environ}}


def _cli(*args) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        timeout=600, env=CLI_ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd")
  torch.manual_seed(0)
  write_byte_level_tokenizer(str(root / "tok"))
  pipe = diffusers.StableDiffusionPipeline(
      unet=perturb_all_weights(diffusers.UNet2DConditionModel(**UNET).eval(), torch, 1),
      vae=perturb_all_weights(diffusers.AutoencoderKL(**VAE).eval(), torch, 2),
      text_encoder=perturb_all_weights(transformers.CLIPTextModel(
          transformers.CLIPTextConfig(**TEXT)).eval(), torch, 3),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(str(root / "tok")),
      scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(root / "pipe", safe_serialization=True)
  _cli("videoldm_jax.cli.convert", f"--diffusers={root / 'pipe'}",
       f"--output={root / 'converted'}")
  return pipe, root


def test_convert_cli_writes_loadable_model(sd_pipeline):
  _, root = sd_pipeline
  model = pretrained.load(root / "converted")
  assert model.unet_config.cross_attention_dim == 32
  assert model.unet_config.attention_levels == (True, False)
  assert model.text_config.num_hidden_layers == 2
  assert model.scheduler["steps_offset"] == 1
  # --single_file options with --diffusers were ignored silently (a user asking for the
  # EMA weights or no text encoder got neither).
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.convert", f"--diffusers={root / 'pipe'}",
       "--extract_ema", "--skip_text_encoder", f"--output={root / 'unused'}"],
      capture_output=True, text=True, timeout=600, env=CLI_ENV)
  assert proc.returncode != 0 and "--skip_text_encoder, --extract_ema: --single_file " \
      "options" in proc.stderr, proc.stderr[-3000:]
  assert not (root / "unused").exists()
  # Restating a default asks for nothing else.
  _cli("videoldm_jax.cli.convert", f"--diffusers={root / 'pipe'}", "--noextract_ema",
       "--preset=sd15", f"--output={root / 'defaults'}")
  assert set(model.params) == {"unet", "vae", "text_encoder"}
  direct, _ = pipeline_import.from_diffusers(root / "pipe")
  for name in direct.params:
    a = traverse_util.flatten_dict(direct.params[name])
    b = traverse_util.flatten_dict(model.params[name])
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}/{k}")
  assert CLIPTokenizer.from_folder(str(root / "converted" / "tokenizer"))(["hi"]).shape == (1, 77)


def test_single_file_route_gives_identical_params(sd_pipeline, tmp_path):
  pipe, root = sd_pipeline
  sd = {}
  sd.update(ldm_export.unet_to_ldm(ldm_export.as_numpy(pipe.unet.state_dict()), 1,
                                   (True, False)))
  sd.update(ldm_export.vae_to_ldm(ldm_export.as_numpy(pipe.vae.state_dict()), 2))
  sd.update({"cond_stage_model.transformer.text_model." + k: v for k, v in
             ldm_export.as_numpy(pipe.text_encoder.state_dict()).items()})
  sd["alphas_cumprod"] = np.ones((1000,), np.float32)  # a schedule buffer: ignored
  import safetensors.numpy
  safetensors.numpy.save_file(sd, str(tmp_path / "tiny-ldm.safetensors"))
  _cli("videoldm_jax.cli.convert", f"--single_file={tmp_path / 'tiny-ldm.safetensors'}",
       f"--preset={root / 'converted' / 'model_index.json'}",
       f"--tokenizer={root / 'tok'}", f"--output={tmp_path / 'out'}")
  # A tokenizer with --skip_text_encoder was dropped silently.
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.convert",
       f"--single_file={tmp_path / 'tiny-ldm.safetensors'}", "--skip_text_encoder",
       f"--tokenizer={root / 'tok'}", f"--output={tmp_path / 'no_text'}"],
      capture_output=True, text=True, timeout=600, env=CLI_ENV)
  assert proc.returncode != 0 and "--tokenizer with --skip_text_encoder" in proc.stderr, \
      proc.stderr[-3000:]
  # Without its text encoder, a text-to-image UNet has no context to attend to when
  # sampled: a Flax shape error deep in the UNet, now a note here and a named refusal
  # wherever it would be sampled.
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.convert",
       f"--single_file={tmp_path / 'tiny-ldm.safetensors'}", "--skip_text_encoder",
       f"--preset={root / 'converted' / 'model_index.json'}",
       f"--output={tmp_path / 'no_text'}"],
      capture_output=True, text=True, timeout=600, env=CLI_ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "note: " in proc.stderr and "cannot be sampled" in proc.stderr, proc.stderr[-3000:]
  no_text = pretrained.load(tmp_path / "no_text")
  assert no_text.text_config is None and "text_encoder" not in no_text.params
  # (A latent cache must then hold the text embeddings: keyframe's cache check.)
  assert sampling.missing_context(no_text)[0].endswith("attn2/to_k/kernel")
  assert sampling.missing_context(pretrained.load(tmp_path / "out")) is None
  cannot = r"cross-attention takes a context of width 32 .* no text encoder"
  with pytest.raises(ValueError, match=cannot):
    sampling.generate(no_text, None, ["a"], options=sampling.SampleOptions(
        height=16, width=16, num_steps=1))
  from videoldm_jax.config_files import load_sibling
  from videoldm_jax.stages import keyframe
  config = load_sibling(str(ROOT / "configs" / "x.py"), "keyframe_tiny").get_config()
  config.image_model = str(tmp_path / "no_text")
  config.sample.every = 5
  with pytest.raises(ValueError, match=cannot + r".*--config.sample.every=0"):
    keyframe.setup(config, tmp_path / "run")
  single = pretrained.load(tmp_path / "out")
  folder = pretrained.load(root / "converted")
  assert single.scheduler == folder.scheduler  # both routes sample alike
  # A preset of another family: the heads (no weight shape shows them) would come from
  # it, a mixed model (SD 2.x weights with SD 1.5's 8 heads) converted silently.
  with pytest.raises(ValueError, match=r"the UNet weights have cross_attention_dim=32.*"
                     r"preset 'sd15' cross_attention_dim=768.*--preset=sd21"):
    pipeline_import.from_single_file(tmp_path / "tiny-ldm.safetensors", "sd15",
                                     with_text_encoder=False)
  for name in folder.params:
    a = traverse_util.flatten_dict(folder.params[name])
    b = traverse_util.flatten_dict(single.params[name])
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}/{k}")


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_text_to_image_matches_diffusers_pipeline(sd_pipeline, sampler):
  pipe, root = sd_pipeline
  if sampler == "dpmpp_2m":
    pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler":
        diffusers.DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="leading")})
    pipe.set_progress_bar_config(disable=True)
  model = pretrained.load(root / "converted")
  tokenizer = CLIPTokenizer.from_folder(str(root / "converted" / "tokenizer"))
  x_T = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompts = ["a red car on a road", "night, rain!"]
  with torch.no_grad():
    ref = pipe(prompts, negative_prompt=["blurry"] * 2, num_inference_steps=6,
               guidance_scale=4.0, height=16, width=16, output_type="latent",
               latents=torch.from_numpy(x_T).permute(0, 3, 1, 2)).images
    ref_img = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample
  options = sampling.SampleOptions(height=16, width=16, num_steps=6, sampler=sampler,
                                        guidance_scale=4.0, progress=False)
  ours = sampling.sample_latents(model, tokenizer, prompts, "blurry", options, x_T=x_T)
  assert max_rel_err(ours, ref.permute(0, 2, 3, 1).numpy()) < 1e-4
  img = sampling.decode(model, ours)
  assert max_rel_err(img, ref_img.permute(0, 2, 3, 1).numpy()) < 1e-4


def test_sample_image_cli_writes_png(sd_pipeline, tmp_path):
  _, root = sd_pipeline
  _cli("videoldm_jax.cli.sample_image", f"--model={root / 'converted'}",
       "--prompt=a truck", "--steps=3", "--height=16", "--width=24", "--num_images=2",
       f"--output={tmp_path / 'img.png'}")
  for i in range(2):
    with Image.open(tmp_path / f"img_{i}.png") as im:
      assert im.size == (24, 16) and im.mode == "RGB"
  # --eta reaches the sampler: DDIM with eta = 1 draws step noise, another image. (No
  # --width: it defaults to the height.)
  for eta in (0, 1):
    _cli("videoldm_jax.cli.sample_image", f"--model={root / 'converted'}",
         "--prompt=a truck", "--steps=3", "--height=16", "--sampler=ddim",
         f"--eta={eta}", f"--output={tmp_path / f'eta{eta}.png'}")
  with Image.open(tmp_path / "eta0.png") as a, Image.open(tmp_path / "eta1.png") as b:
    assert a.size == b.size == (16, 16)
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() > 0


def test_pickle_checkpoints_are_refused_with_instructions(tmp_path):
  ckpt = tmp_path / "v1-5.ckpt"
  ckpt.write_bytes(b"\x80\x04not really")
  with pytest.raises(PickleRefused, match=r"safetensors.*weights_only=True"):
    pipeline_import.from_single_file(ckpt, "sd15")
  with pytest.raises(PickleRefused, match=r"v1-5.ckpt: refusing a pickle checkpoint"):
    load_safetensors(ckpt)  # (the reader itself, not only its callers)
  folder = tmp_path / "pipe"
  for sub in ("unet", "vae"):
    (folder / sub).mkdir(parents=True)
    (folder / sub / "config.json").write_text(json.dumps(
        {**UNET, "_class_name": "UNet2DConditionModel"} if sub == "unet" else VAE))
    (folder / sub / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
  with pytest.raises(PickleRefused, match="diffusion_pytorch_model.bin"):
    pipeline_import.from_diffusers(folder)


def test_truncated_safetensors_is_a_clear_error(sd_pipeline, tmp_path):
  _, root = sd_pipeline
  data = (root / "pipe" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="bad.safetensors.*truncated"):
    load_safetensors(bad)
  bad.write_bytes(b"hello")
  with pytest.raises(ValueError, match="bad.safetensors: not a safetensors file"):
    load_safetensors(bad)
  # Headers of another shape were a bare AttributeError / KeyError naming no file.
  import struct
  for header, said in (([1, 2], "the header is a JSON list, expected an object"),
                       ({"a": {"dtype": "F32", "shape": [1]}}, "tensor a: expected an object "
                        "with dtype, shape"),
                       # (unpacking / slicing / reshape errors naming no file)
                       ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2, 4]}},
                        "tensor a: expected"),
                       ({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 4]}},
                        "tensor a: expected"),
                       ({"a": {"dtype": "F32", "shape": 1, "data_offsets": [0.0, 4.0]}},
                        "tensor a: expected")):
    text = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))
    with pytest.raises(ValueError, match=f"bad.safetensors: not a safetensors file \\({said}"):
      load_safetensors(bad)
  # Tensors of no elements take no bytes: a file of only those was refused as truncated.
  import safetensors.numpy
  empty = tmp_path / "empty.SAFETENSORS"  # (the suffix in any case)
  safetensors.numpy.save_file({"a": np.zeros((0, 3), np.float32)}, str(empty))
  assert load_safetensors(empty)["a"].shape == (0, 3)


def test_vae_folder_with_pre_0_15_attention_names(sd_pipeline, tmp_path):
  # VAE folders saved before diffusers 0.15 (SD 1.5's on the Hub) call the mid-block
  # attention's projections query / key / value / proj_attn; diffusers renames them on
  # load, and so must we.
  import shutil
  import safetensors.numpy
  from videoldm_jax.convert import image_models
  _, root = sd_pipeline
  shutil.copytree(root / "pipe" / "vae", tmp_path / "vae")
  weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  sd = load_safetensors(weights)
  renamed = {}
  for k, v in sd.items():
    for new, legacy in old.items():
      k = k.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
    renamed[k] = v
  # weight and bias of the encoder's and the decoder's mid-block attention
  assert sum(".proj_attn." in k for k in renamed) == 4
  safetensors.numpy.save_file(renamed, str(weights))
  _, params = image_models.load_diffusers_vae(tmp_path / "vae")
  _, ref = image_models.load_diffusers_vae(root / "pipe" / "vae")
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, b)


def test_save_checks_before_writing_and_keeps_schedule_fields(sd_pipeline, tmp_path):
  import dataclasses
  from videoldm_jax.diffusion import schedules
  _, root = sd_pipeline
  model = pretrained.load(root / "converted")
  # clip_sample_range changes what the sampler does: it must survive a save (a NumPy
  # scalar too, written as a JSON number).
  clipped = dataclasses.replace(model, scheduler={**model.scheduler, "clip_sample": True,
                                                  "clip_sample_range": np.float32(2.0)})
  clipped = dataclasses.replace(clipped, scheduler={**clipped.scheduler,
                                                    "timestep_spacing": "trailing"})
  pretrained.save(tmp_path / "clipped", clipped)
  loaded = pretrained.load(tmp_path / "clipped").scheduler
  _, sampling_config = schedules.schedule_from_diffusers_config(loaded)
  assert sampling_config.clip_sample == 2.0
  assert loaded["timestep_spacing"] == "trailing"  # (SD 2.x's "leading" picks other steps)
  # A schedule this package cannot sample with fails before anything is written (it
  # was dropped on save and the model then sampled without it) ...
  thresholded = dataclasses.replace(model, scheduler={**model.scheduler, "thresholding": True})
  with pytest.raises(ValueError, match="thresholding=True"):
    pretrained.save(tmp_path / "thresholded", thresholded)
  assert not (tmp_path / "thresholded").exists()
  # ... as does a tokenizer folder that is not one (it was checked after the params
  # were written, leaving a folder that loaded as if complete).
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.save(tmp_path / "out", model, tmp_path / "no_tokenizer")
  assert not (tmp_path / "out").exists()
  # ... or one with ids past the text encoder's table (their embeddings were NaN).
  small = dataclasses.replace(model, text_config=dataclasses.replace(model.text_config,
                                                                     vocab_size=300))
  with pytest.raises(ValueError, match=r"token id 513 .* vocab_size is 300"):
    pretrained.save(tmp_path / "out", small, root / "converted" / "tokenizer")
  assert not (tmp_path / "out").exists()
  assert not list(tmp_path.glob(".*partial"))


def test_fp16_variant_folder_and_missing_scheduler(sd_pipeline, tmp_path, capsys):
  # diffusers' variant="fp16" saves <stem>.fp16.safetensors only; it loads as float32.
  import shutil
  import safetensors.numpy
  from videoldm_jax.convert import image_models
  _, root = sd_pipeline
  shutil.copytree(root / "pipe", tmp_path / "pipe")
  unet = tmp_path / "pipe" / "unet"
  sd = load_safetensors(unet / "diffusion_pytorch_model.safetensors")
  (unet / "diffusion_pytorch_model.safetensors").unlink()
  safetensors.numpy.save_file({k: v.astype(np.float16) for k, v in sd.items()},
                              str(unet / "diffusion_pytorch_model.fp16.safetensors"))
  _, half = image_models.load_diffusers_unet(unet)
  _, full = image_models.load_diffusers_unet(root / "pipe" / "unet")
  for a, b in zip(jax.tree_util.tree_leaves(half), jax.tree_util.tree_leaves(full)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b.astype(np.float16).astype(np.float32))
  # An outdated scheduler config is corrected as diffusers' StableDiffusionPipeline
  # corrects it on load (kept as it was, it clipped latents to [-1, 1]: 0.95 relative
  # error after 5 DDIM steps against diffusers; steps_offset 0: 0.019).
  sched = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
  sched.write_text(json.dumps({**json.loads(sched.read_text()), "clip_sample": True,
                               "steps_offset": 0}))
  capsys.readouterr()
  model, _ = pipeline_import.from_diffusers(tmp_path / "pipe")
  assert model.scheduler["clip_sample"] is False and model.scheduler["steps_offset"] == 1
  assert "clip_sample: True -> False" in capsys.readouterr().err
  # Without scheduler/ the SD 1.5 schedule is assumed, and said.
  shutil.rmtree(tmp_path / "pipe" / "scheduler")
  model, _ = pipeline_import.from_diffusers(tmp_path / "pipe")
  assert model.scheduler["prediction_type"] == "epsilon"
  assert "has no scheduler/scheduler_config.json: assuming SD 1.5's" in capsys.readouterr().err


def test_a_class_conditional_unet_with_a_context_but_no_text_encoder_is_refused(tmp_path):
  # Such models are run without a context (attn2 on their own tokens): one trained with
  # an external context of width 48 converted, then failed in every sampler with a
  # parameter shape error.
  unet = diffusers.UNet2DConditionModel(**{**UNET, "cross_attention_dim": 48,
                                           "num_class_embeds": 3})
  unet.save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=True)
  diffusers.AutoencoderKL(**VAE).save_pretrained(tmp_path / "pipe" / "vae",
                                                 safe_serialization=True)
  diffusers.DDIMScheduler(**SCHEDULER).save_pretrained(tmp_path / "pipe" / "scheduler")
  with pytest.raises(ValueError, match=r"class-conditional UNet without a text encoder whose "
                     r"cross-attention takes a context of cross_attention_dim=48 .*attn2/"
                     r"to_k/kernel: \(48, 32\), self-attention needs \(32, 32\)"):
    pipeline_import.from_diffusers(tmp_path / "pipe")


def test_unet_config_fields_left_out_take_diffusers_defaults():
  # diffusers' from_config fills a field config.json leaves out with the default of
  # UNet2DConditionModel.__init__; a hand-written config.json may rely on that.
  import inspect
  from videoldm_jax.convert.diffusers_config import unet_config_from_diffusers
  defaults = {name: p.default for name, p in inspect.signature(
      diffusers.UNet2DConditionModel.__init__).parameters.items()
      if p.default is not inspect.Parameter.empty}
  assert unet_config_from_diffusers({}) == unet_config_from_diffusers(defaults)
  assert unet_config_from_diffusers({}).block_out_channels == tuple(
      defaults["block_out_channels"])


def test_save_copies_every_tokenizer_file_and_load_checks_them(sd_pipeline, tmp_path):
  # special_tokens_map.json (SD 2.x's pad token "!") and added_tokens.json (textual
  # inversion) change the ids: a copy without them embeds prompts differently.
  import shutil
  _, root = sd_pipeline
  tok = tmp_path / "tok"
  shutil.copytree(root / "tok", tok)
  vocab = json.loads((tok / "vocab.json").read_text())
  (tok / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
  (tok / "added_tokens.json").write_text(json.dumps({"a</w>": vocab["a</w>"]}))
  folder = pretrained.save(tmp_path / "model", pretrained.load(root / "converted"), tok)
  assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == sorted(
      p.name for p in tok.iterdir())
  model, loaded = pretrained.load_with_tokenizer(folder)
  source = CLIPTokenizer.from_folder(str(tok))
  assert loaded.pad_token_id == source.pad_token_id == vocab["!"]
  np.testing.assert_array_equal(loaded(["a cat!"]), source(["a cat!"]))
  # A tokenizer edited after the save to ids past the text encoder's table is refused
  # on load (all-NaN prompt embeddings otherwise).
  n = model.text_config.vocab_size
  (folder / "tokenizer" / "added_tokens.json").write_text(json.dumps({"<new>": n}))
  with pytest.raises(ValueError, match=rf"{folder}.* token id {n}"):
    pretrained.load_with_tokenizer(folder)


def test_unet_config_fields_are_read_or_refused():
  # Fields no weight shape shows: each translated, or refused where we implement one value.
  from videoldm_jax.convert.diffusers_config import (unet_config_from_diffusers,
                                                     vae_config_from_diffusers)
  got = unet_config_from_diffusers({"norm_eps": 1e-3, "use_linear_projection": True,
                                    "cross_attention_dim": 64, "freq_shift": 1,
                                    "flip_sin_to_cos": False, "norm_num_groups": 16,
                                    "block_out_channels": [32, 64, 64, 64]})
  assert (got.norm_eps, got.use_linear_projection, got.cross_attention_dim, got.freq_shift,
          got.flip_sin_to_cos, got.norm_num_groups) == (1e-3, True, 64, 1, False, 16)
  for field, value in (("act_fn", "gelu"), ("only_cross_attention", True),
                       ("attention_type", "gated"), ("resnet_time_scale_shift", "scale_shift"),
                       ("time_embedding_type", "fourier"), ("class_embed_type", "timestep"),
                       ("conv_in_kernel", 7), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn")):
    with pytest.raises(ValueError, match=f"unet/config.json: unsupported {field}="):
      unet_config_from_diffusers({field: value})
  with pytest.raises(ValueError, match="vae/config.json: unsupported act_fn='gelu'"):
    vae_config_from_diffusers({"act_fn": "gelu"})
  # Per-channel latent statistics (SDXL-era VAEs) would need more than one scaling
  # factor: refused, not converted to wrong latents.
  with pytest.raises(ValueError, match="per-channel latents_mean/std are not supported"):
    vae_config_from_diffusers({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
  vae = vae_config_from_diffusers({"use_quant_conv": False, "use_post_quant_conv": False,
                                   "mid_block_add_attention": False})
  assert (vae.use_quant_conv, vae.use_post_quant_conv, vae.mid_block_add_attention) == (
      False, False, False)


def test_sd2_presets_are_the_release_configs():
  # No weight shape shows the heads or the text encoder's depth: a wrong preset converts
  # real SD 2.x files to a different model silently. Against SD 2.1's unet/config.json
  # (the fields that differ from diffusers' defaults; "attention_head_dim" there holds
  # the head counts, 64 channels each).
  from videoldm_jax.convert.diffusers_config import unet_config_from_diffusers
  from videoldm_jax.convert.presets import PRESETS
  release = unet_config_from_diffusers({"attention_head_dim": [5, 10, 20, 20],
                                        "cross_attention_dim": 1024,
                                        "use_linear_projection": True})
  for name, prediction in (("sd21", "v_prediction"), ("sd21-base", "epsilon")):
    preset = PRESETS[name]
    assert preset.unet.heads_per_level() == release.heads_per_level() == (5, 10, 20, 20)
    assert dataclasses.replace(preset.unet, num_heads=release.num_heads,
                               head_dim=None) == release
    # OpenCLIP ViT-H/14 up to its penultimate layer (SD 2.x's text_encoder/config.json).
    t = preset.text
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.hidden_act) == (1024, 4096, 23, 16, "gelu")
    assert preset.scheduler["prediction_type"] == prediction


def test_output_folders_are_checked_before_the_model_is_built(tmp_path):
  # An existing output was refused only by the save, after the model was built (48 s
  # for an SD-sized random model), and a file given as --output failed with a bare
  # NotADirectoryError.
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "x").write_text("")
  afile = tmp_path / "afile"
  afile.write_text("")
  for args, message in (
      (["videoldm_jax.cli.init_random", "--config=configs/image_tiny.py",
        f"--output={afile}"], "exists and is not a folder"),
      (["videoldm_jax.cli.convert", f"--diffusers={tmp_path / 'absent'}",
        f"--output={taken}"], "exists and is not empty"),
      (["videoldm_jax.cli.convert", f"--diffusers={tmp_path / 'absent'}",
        f"--single_file={afile}", f"--output={tmp_path / 'new'}"],
       "give exactly one of --diffusers and --single_file"),
      # (a folder with a text encoder and no tokenizer failed only when loaded)
      (["videoldm_jax.cli.convert", f"--single_file={afile}", f"--output={tmp_path / 'new'}"],
       "--single_file needs --tokenizer=FOLDER")):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300, env=CLI_ENV, cwd=ROOT)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_model_index_files_and_linked_outputs_are_named(tmp_path):
  # A damaged model_index.json raised a bare JSONDecodeError / AttributeError /
  # TypeError / KeyError naming no file; an output given as a link to an empty folder
  # passed the up-front check and failed at the final rename, after the work.
  from videoldm_jax import pretrained, upsampler_model
  folder = tmp_path / "model"
  folder.mkdir()
  index = folder / "model_index.json"
  ok = {"format": pretrained.FORMAT, "format_version": 1, "unet": {}, "vae": {},
        "scheduler": {}}
  for text, message in (
      ('{"format": ', r"not a JSON file \(not valid JSON"),
      (b"\xff\xfe\x00binary", r"not a JSON file \(not valid JSON"),  # (not UTF-8)
      ("[1, 2]", "expected a JSON object, got a list"),
      (json.dumps(dict(ok, format_version="1")), "format_version '1', expected a whole"),
      (json.dumps(dict(ok, format_version=-1)), "format_version -1, expected a whole"),
      (json.dumps(dict(ok, format_version=True)), "format_version True, expected a whole"),
      (json.dumps(dict(ok, text_encoder="clip")),
       "'text_encoder' must be a JSON object or null, got str 'clip'"),
      (json.dumps(dict(ok, training=[1])), "'training' must be a JSON object or null"),
      (json.dumps(dict(ok, format_version=2)), "format_version 2 is newer"),
      (json.dumps({k: v for k, v in ok.items() if k != "unet"}), r"no \['unet'\] entries")):
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=f"{re.escape(str(index))}: {message}"):
      pretrained.load_index(folder)
  index.write_text(json.dumps(ok))
  assert pretrained.load_index(folder) == ok
  # A whole number where a float is expected is a float (a hand-written config).
  from videoldm_jax.models.vae import VAEConfig
  assert VAEConfig.from_dict({"scaling_factor": 1}).scaling_factor == 1
  # A field of the wrong type failed deep in the model (a string layer count: a
  # TypeError in the UNet) or was taken (a string epsilon); named before the weights.
  for config, message in (
      (dict(ok, unet={"layers_per_block": "1"}),
       r"UNetConfig.layers_per_block='1': expected int"),
      (dict(ok, vae={"scaling_factor": "0.18"}),
       r"VAEConfig.scaling_factor='0.18': expected float"),
      (dict(ok, unet={"block_out_channels": 320}),
       r"UNetConfig.block_out_channels=320: expected tuple\[int, \.\.\.\]"),
      (dict(ok, temporal={"conv_kernel": [3, 1]}),
       r"TemporalConfig.conv_kernel=\[3, 1\]: expected tuple\[int, int, int\]"),
      (dict(ok, unet={"layers_per_block": True}),
       r"UNetConfig.layers_per_block=True: expected int"),
      (dict(ok, unet={"block_out_channels": [320, "640"]}),
       r"UNetConfig.block_out_channels=\[320, '640'\]: expected tuple\[int, \.\.\.\]"),
      (dict(ok, text_encoder={"eos_token_id": "x"}),  # (an `int | None` field)
       r"CLIPTextConfig.eos_token_id='x': expected int \| None"),
      (dict(ok, vae={"scaling_factor": True}),  # (a bool is an int, not a float)
       r"VAEConfig.scaling_factor=True: expected float")):
    index.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{re.escape(str(index))}: {message}"):
      pretrained.load(folder)
  # Damaged weights are named as such, the folder with them.
  from videoldm_jax.config_files import load_sibling
  model = pretrained.random_image_ldm(
      load_sibling(str(ROOT / "configs" / "x.py"), "image_tiny").get_config("classes=2"))
  # (a diffusers scheduler config also holds a sampler's choices: not the schedule's)
  pretrained.save(tmp_path / "saved", dataclasses.replace(model, scheduler={
      **model.scheduler, "_class_name": "DPMSolverMultistepScheduler", "solver_order": 2}))
  loaded = pretrained.load(tmp_path / "saved")
  assert loaded.source == model.source  # (what it was made from, not this folder)
  assert loaded.scheduler == model.scheduler
  # "training": null is no record, by the loader and by the stages' abstract setup
  # (videoldm-compile's), which reads the index itself.
  saved_index = tmp_path / "saved" / "model_index.json"
  saved_index.write_text(json.dumps({**json.loads(saved_index.read_text()),
                                     "training": None}))
  assert pretrained.load(tmp_path / "saved").training == {}
  import ml_collections
  from videoldm_jax.stages import base, keyframe
  with base.abstract_setup():
    abstract, _, _ = keyframe.load_image_model(
        ml_collections.ConfigDict({"image_model": str(tmp_path / "saved")}), tmp_path / "w")
  assert abstract.training == {}
  with pytest.raises(FileNotFoundError, match="saved/params: missing"):
    pretrained.read_params(tmp_path / "missing" / "saved" / "params")
  for f in (tmp_path / "saved" / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(f.read_bytes()[:100])
  with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'saved' / 'params'))}: "
                     "unreadable or incomplete Orbax checkpoint"):
    pretrained.load(tmp_path / "saved")
  up = folder / upsampler_model.INDEX
  up.write_text("[]")
  with pytest.raises(ValueError, match=f"{re.escape(str(up))}: expected a JSON object"):
    upsampler_model.load(folder, read_params=False)
  empty = tmp_path / "empty"
  empty.mkdir()
  for link, target in ((tmp_path / "link", empty), (tmp_path / "dangling", tmp_path / "no")):
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match=f"{re.escape(str(link))}: is a symbolic link"):
      pretrained.check_new_folder(link)
  # A leftover partial sibling that is a file or a link is replaced as a folder is.
  (tmp_path / ".new.partial").write_text("")
  (tmp_path / ".other.partial").symlink_to(empty)
  for name in ("new", "other"):
    pretrained.write_folder(tmp_path / name, lambda d: (d.mkdir(), (d / "x").write_text("")))
    assert (tmp_path / name / "x").is_file() and not (tmp_path / f".{name}.partial").exists()
  assert empty.is_dir()


def test_weight_files_dtypes_and_single_file_keys(tmp_path):
  # What real checkpoints hold and the tiny test models do not.
  import ml_dtypes
  import torch
  from safetensors.torch import save_file
  from videoldm_jax.convert import diffusers_config, ldm_keys, presets
  from videoldm_jax.convert.safetensors_io import find_weights
  from videoldm_jax.models.unet import UNetConfig
  # bfloat16 (many fine-tuned single files): read as bfloat16, values exact.
  t = torch.randn(3, 4).bfloat16()
  save_file({"a": t}, str(tmp_path / "bf16.safetensors"))
  a = load_safetensors(tmp_path / "bf16.safetensors")["a"]
  assert a.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(a.astype(np.float32), t.float().numpy())
  # A Hub folder with both precisions: the full one.
  for name in ("diffusion_pytorch_model.fp16.safetensors",
               "diffusion_pytorch_model.safetensors"):
    (tmp_path / name).touch()
  assert find_weights(tmp_path, "diffusion_pytorch_model").name == \
      "diffusion_pytorch_model.safetensors"
  # Only an upper-case pickle: the conversion instructions, not "no weights found".
  (tmp_path / "pickled").mkdir()
  (tmp_path / "pickled" / "MODEL.BIN").touch()
  with pytest.raises(PickleRefused, match="refusing a pickle checkpoint"):
    find_weights(tmp_path / "pickled", "diffusion_pytorch_model")
  # SD 1.5's cross-attention keys are (320, 768): the context width is the input side.
  to_k = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
  assert presets.unet_config_from_weights(UNetConfig(), {to_k: np.zeros((320, 768))}
                                          ).cross_attention_dim == 768
  # A full (unpruned) LDM file: the autoencoder's training-loss weights are left out,
  # and --extract_ema takes the UNet from model_ema (keys without dots).
  u, v = ldm_keys.UNET_PREFIX, ldm_keys.VAE_PREFIX
  sd = {u + "out.2.weight": np.zeros(2), u + "input_blocks.0.0.bias": np.zeros(2),
        "model_ema.diffusion_modelout2weight": np.ones(2),
        "model_ema.diffusion_modelinput_blocks00bias": np.full(2, 2.0),
        v + "decoder.conv_in.weight": np.zeros(1), v + "loss.logvar": np.zeros(1)}
  parts = ldm_keys.split_single_file(sd, "x.safetensors", extract_ema=True)
  assert list(parts["vae"]) == ["decoder.conv_in.weight"]
  assert {k: float(x[0]) for k, x in parts["unet"].items()} == {
      "out.2.weight": 1.0, "input_blocks.0.0.bias": 2.0}
  assert float(ldm_keys.split_single_file(sd, "x")["unet"]["out.2.weight"][0]) == 0.0
  del sd["model_ema.diffusion_modelout2weight"]
  with pytest.raises(ValueError, match="--extract_ema but model_ema.diffusion_modelout2weight "
                     "is missing"):
    ldm_keys.split_single_file(sd, "x.safetensors", extract_ema=True)
  # A full training checkpoint's schedule buffers (CompVis LatentDiffusion's) are left
  # out; other keys are named.
  buffers = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
             "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
             "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
             "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
             "logvar", "model_ema.decay", "model_ema.num_updates"]
  full = {**sd, **{k: np.zeros(1) for k in buffers}}
  assert set(ldm_keys.split_single_file(full, "x")["unet"]) == {"out.2.weight",
                                                                "input_blocks.0.0.bias"}
  with pytest.raises(ValueError, match=r"keys outside the UNet .*: \['foo'\]"):
    ldm_keys.split_single_file({**full, "foo": np.zeros(1)}, "x")
  # A class-conditional UNet's label table gives its class count.
  assert presets.unet_config_from_weights(UNetConfig(), {"label_emb.weight": np.zeros(
      (10, 1280))}).num_class_embeds == 10
  # Conv3d kernels (O, I, T, H, W) -> (T, H, W, I, O), and back.
  from videoldm_jax.convert.torch_layout import flax_to_torch_array, torch_to_flax_array
  w = np.random.default_rng(0).standard_normal((2, 3, 4, 5, 6))
  k = torch_to_flax_array("kernel", w)
  assert k.shape == (4, 5, 6, 3, 2) and k[1, 2, 3, 2, 1] == w[1, 2, 1, 2, 3]
  np.testing.assert_array_equal(flax_to_torch_array("kernel", k), w)
  # Fields older configs leave out: SD's values.
  assert pipeline_import.sd_scheduler_fixes({"beta_schedule": "scaled_linear"}, "x"
                                            )["steps_offset"] == 1
  assert diffusers_config.vae_config_from_diffusers({}).scaling_factor == 0.18215
  with pytest.raises(ValueError, match=r"vae/config.json: down_block_types has 3 entries, "
                     r"block_out_channels \[8, 16\] 2: one block per level"):
    diffusers_config.vae_config_from_diffusers({"block_out_channels": [8, 16],
                                                "down_block_types": ["DownEncoderBlock2D"] * 3})


def test_single_file_mismatches_name_the_files_own_keys():
  # A single file's problems were named by the diffusers keys it is renamed to
  # ("missing: down_blocks.0.resnets.0.conv1.weight"), which its user cannot find in it;
  # a mid-attention kernel other than 1x1 failed with NumPy's bare reshape error, and an
  # integer tensor in a weight's place was cast without a word.
  from tests.test_generate import tiny_image_config
  from videoldm_jax.convert import image_models
  from videoldm_jax.convert.torch_layout import ConversionError, export_state_dict
  model = pretrained.random_image_ldm(tiny_image_config())
  unet = {k[len("model.diffusion_model."):]: v for k, v in ldm_export.unet_to_ldm(
      export_state_dict(model.params["unet"]), 1, (False,)).items()}
  vae = {k[len("first_stage_model."):]: v for k, v in ldm_export.vae_to_ldm(
      export_state_dict(model.params["vae"]), 2).items()}
  conv = "input_blocks.1.0.in_layers.2.weight"
  assert conv in unet
  with pytest.raises(ConversionError, match=r"missing: model\.diffusion_model\.input_blocks"
                     r"\.1\.0\.in_layers\.2\.weight \(diffusers down_blocks\.0\.resnets\.0"
                     r"\.conv1\.weight\)"):
    image_models.unet_from_ldm(model.unet_config, {k: v for k, v in unet.items()
                                                   if k != conv}, "x.safetensors")
  with pytest.raises(ConversionError, match=r"dtype: model\.diffusion_model\.input_blocks\.1"
                     r"\.0\.in_layers\.2\.weight \(diffusers .*\) is int64, Flax param .* "
                     "expects floating-point weights"):
    image_models.unet_from_ldm(model.unet_config, {**unet, conv: unet[conv].astype(np.int64)},
                               "x.safetensors")
  with pytest.raises(ConversionError, match=r"unmapped: model\.diffusion_model\.extra\.weight "
                     r"\(3,\)"):
    image_models.unet_from_ldm(model.unet_config, {**unet, "extra.weight": np.zeros(3)},
                               "x.safetensors")
  q = "decoder.mid.attn_1.q.weight"
  with pytest.raises(ConversionError, match=r"shape mismatch: first_stage_model\.decoder\.mid"
                     r"\.attn_1\.q\.weight \(diffusers decoder\.mid_block\.attentions\.0\.to_q"
                     r"\.weight\) has \(16, 16, 3, 3\)"):
    image_models.vae_from_ldm(model.vae_config, {**vae, q: np.zeros((16, 16, 3, 3))},
                              "x.safetensors")


def test_an_unconverted_diffusers_folder_is_named_as_one(tmp_path):
  # The likeliest wrong --model / --image_checkpoint: a diffusers pipeline folder, whose
  # own model_index.json read as "format None, expected 'videoldm-jax/image-ldm'".
  (tmp_path / "model_index.json").write_text(json.dumps(
      {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
       "unet": ["diffusers", "UNet2DConditionModel"]}))
  with pytest.raises(ValueError, match=r"a diffusers pipeline folder \(StableDiffusionPipeline"
                     r"\), not a videoldm-jax model folder; convert it first: videoldm-convert "
                     f"--diffusers={re.escape(str(tmp_path))} --output=NEW_FOLDER"):
    pretrained.load(tmp_path, weights=False)


def test_a_diffusers_folder_without_its_text_encoder_is_noted(sd_pipeline, tmp_path):
  # As --single_file with --skip_text_encoder is: the folder converted without a word,
  # and every sampler refused the result.
  import shutil
  _, root = sd_pipeline
  shutil.copytree(root / "pipe", tmp_path / "pipe", ignore=shutil.ignore_patterns(
      "text_encoder", "tokenizer"))
  proc = _cli("videoldm_jax.cli.convert", f"--diffusers={tmp_path / 'pipe'}",
              f"--output={tmp_path / 'out'}")
  assert f"note: {tmp_path / 'pipe'}: its UNet's cross-attention takes a context" in \
      proc.stderr and "cannot be sampled" in proc.stderr, proc.stderr[-3000:]
