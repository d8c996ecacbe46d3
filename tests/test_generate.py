"""videoldm-generate (the whole chain, streamed to an mp4) and personalisation.

Tiny random models of every stage are built directly from their configs and saved as
folders once per module: key-frame, prediction and interpolation models (one-level
UNet), a temporal decoder, a pixel-space 4x upsampler. Training plays no part: these
tests check the plumbing (lengths, sizes, chunking, skipped stages, parameter swaps),
not the pictures.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

pytest.importorskip("av")

from videoldm_jax import pretrained, video_io  # noqa: E402
from videoldm_jax import upsampler_model as um  # noqa: E402
from videoldm_jax.config_files import load_sibling  # noqa: E402
from videoldm_jax.models import params as params_lib  # noqa: E402
from videoldm_jax.models import partition  # noqa: E402
from videoldm_jax.models import vae as vae_lib  # noqa: E402
from videoldm_jax.models.temporal import TemporalConfig  # noqa: E402
from videoldm_jax.models.tokenizer import write_byte_level_tokenizer  # noqa: E402
from videoldm_jax.models.vae import AutoencoderKL, VAETemporalConfig  # noqa: E402
from videoldm_jax.pipelines import chain_models, generate, personalize, streaming  # noqa: E402
from videoldm_jax.pipelines import sampling  # noqa: E402
from videoldm_jax.stages import upsampler as upsampler_stage  # noqa: E402
from videoldm_jax.train.state import merge  # noqa: E402
from videoldm_jax.video_ldm import VideoLDM  # noqa: E402

ROOT = Path(__file__).parents[1]


def tiny_image_config(seed: int = 0, vae_channels=(16, 16)) -> ml_collections.ConfigDict:
  """A one-level UNet (fast to compile) and an f2 VAE (f = 2 ** (levels - 1))."""
  return ml_collections.ConfigDict(dict(
      seed=seed,
      unet=dict(block_out_channels=(16,), layers_per_block=1, attention_levels=(False,),
                num_heads=2, cross_attention_dim=16, norm_num_groups=8),
      vae=dict(block_out_channels=vae_channels, layers_per_block=1, norm_num_groups=8),
      text_encoder=dict(vocab_size=514, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=2,
                        max_position_embeddings=16),
      scheduler=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                     prediction_type="epsilon")))


def _perturb(tree: dict, seed: int, scale: float = 0.05) -> dict:
  """Noise on every leaf, so that zero-initialised layers (context projections, the
  temporal ResBlocks' last convs) are not identities and every parameter matters."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: (a + scale * rng.standard_normal(a.shape)).astype(a.dtype), tree)


def video_model(image: pretrained.PretrainedLDM, temporal: TemporalConfig, seed: int
                ) -> pretrained.PretrainedLDM:
  """The image model plus a random (perturbed) phi, as a stage export holds it."""
  ldm = VideoLDM.from_pretrained(image, temporal)
  phi = _perturb(ldm.init_unet_params(seed, where=partition.is_temporal), seed)
  return pretrained.PretrainedLDM(
      image.unet_config, image.vae_config, image.text_config, image.scheduler,
      {**image.params, "unet": merge(image.params["unet"], phi)},
      source=f"test video model {seed}", temporal_config=temporal)


def save_stage_folders(root: Path, image_config=None, upsampler: bool = True,
                       interpolator2: bool = True) -> dict:
  """Writes key-frame, predictor, interpolator (x2), decoder (and upsampler) folders."""
  image = pretrained.random_image_ldm(image_config or tiny_image_config())
  write_byte_level_tokenizer(str(root / "tok"))
  ctx = TemporalConfig(context_frames=True)
  folders = {}
  for name, temporal, seed in (("keyframe", TemporalConfig(), 1), ("predictor", ctx, 2),
                               ("interpolator", ctx, 3), ("interpolator2", ctx, 4)):
    if name == "interpolator2" and not interpolator2:
      continue
    folders[f"{name}_model"] = str(pretrained.save(
        root / name, video_model(image, temporal, seed), root / "tok"))
  vt = VAETemporalConfig()
  vae = AutoencoderKL(image.vae_config, vt)
  new = _perturb(params_lib.init_params(vae, 5, *vae_lib.example_inputs(image.vae_config,
                                                                       video=True),
                                        where=partition.is_temporal), 5)
  decoder = pretrained.PretrainedLDM(
      image.unet_config, image.vae_config, image.text_config, image.scheduler,
      {**image.params, "vae": merge(image.params["vae"], new)},
      source="test decoder", vae_temporal_config=vt)
  folders["decoder_model"] = str(pretrained.save(root / "decoder", decoder, root / "tok"))
  if upsampler:
    c = load_sibling(str(ROOT / "configs" / "x.py"), "upsampler_tiny").get_config()
    c.unet = dict(block_out_channels=(16, 16), layers_per_block=1,
                  attention_levels=(False, False), num_heads=2, transformer_depth=1,
                  use_linear_projection=True, norm_num_groups=8)
    config, _, _ = upsampler_stage.build_model(c)
    params = {"unet": _perturb(um.init_unet_params(config, 6), 6)}
    folders["upsampler_model"] = str(um.save(root / "upsampler",
                                             um.PretrainedUpsampler(config, params)))
  return folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
  return save_stage_folders(tmp_path_factory.mktemp("stages"))


@pytest.fixture(scope="module")
def dreambooth(tmp_path_factory) -> tuple:
  """(an image LDM of the same base architecture with other weights, its folder)."""
  model = pretrained.random_image_ldm(tiny_image_config(seed=11))
  return model, pretrained.save(tmp_path_factory.mktemp("db") / "db", model)


# Lengths in key frames: clips of T = 4 key frames, 2 of them context in each
# prediction round (2 new key frames per round).
FAST = dict(height=8, width=8, steps=2, keyframes_per_clip=4, num_context=2,
            guidance_scale=2.0, context_scale=1.5, decode_chunk=8, decode_overlap=2,
            upsample_chunk=8, upsample_overlap=2, upsampler_steps=1, fps=8.0,
            progress=False)


# --- personalisation ----------------------------------------------------------------------

def test_personalisation_swaps_theta_and_keeps_phi(folders, dreambooth):
  dreambooth, db_dir = dreambooth  # "a DreamBooth fine-tune"
  video = pretrained.load(folders["predictor_model"])
  out = personalize.load_personalized(folders["predictor_model"], db_dir)
  theta, phi = partition.split(out.params["unet"])
  theta_db = traverse_util.flatten_dict(dreambooth.params["unet"])
  flat = traverse_util.flatten_dict(theta)
  assert flat.keys() == theta_db.keys()
  for k, v in flat.items():
    np.testing.assert_array_equal(v, theta_db[k])
    assert v.dtype == theta_db[k].dtype
  _, phi_video = partition.split(video.params["unet"])
  phi_flat, phi_ref = traverse_util.flatten_dict(phi), traverse_util.flatten_dict(phi_video)
  assert phi_flat.keys() == phi_ref.keys() and phi_flat
  for k, v in phi_flat.items():
    np.testing.assert_array_equal(v, phi_ref[k])
  # Only the UNet by default: VAE and text encoder stay the video model's.
  for part in ("vae", "text_encoder"):
    for a, b in zip(jax.tree_util.tree_leaves(out.params[part]),
                    jax.tree_util.tree_leaves(video.params[part])):
      np.testing.assert_array_equal(a, b)
  assert out.temporal_config == video.temporal_config
  # What the video model was trained on stays (generate plans its chain from it).
  record = {"stage": "predictor", "num_frames": 4, "max_context": 2}
  trained = personalize.personalize(dataclasses.replace(video, training=record), dreambooth)
  assert trained.training == record
  # The same architecture spelt otherwise (heads per level as a tuple, as the diffusers
  # route writes SD 2.x; the EOS id that only picks the pooled output) is the same base.
  respelt = dataclasses.replace(
      dreambooth, unet_config=dataclasses.replace(
          dreambooth.unet_config, num_heads=dreambooth.unet_config.heads_per_level()),
      text_config=dataclasses.replace(dreambooth.text_config, eos_token_id=2))
  with_text = personalize.personalize(video, respelt, ("unet", "text_encoder"))
  for a, b in zip(jax.tree_util.tree_leaves(with_text.params["text_encoder"]),
                  jax.tree_util.tree_leaves(dreambooth.params["text_encoder"]), strict=True):
    np.testing.assert_array_equal(a, b)
  # One architecture, another parametrisation (SD 2.1 vs SD 2.1-base): refused.
  v_pred = dataclasses.replace(dreambooth, scheduler={**dreambooth.scheduler,
                                                      "prediction_type": "v_prediction"})
  with pytest.raises(ValueError, match="its UNet predicts 'v_prediction', the video "
                     "model's 'epsilon'"):
    personalize.personalize(video, v_pred)
  other_betas = dataclasses.replace(dreambooth, scheduler={**dreambooth.scheduler,
                                                           "beta_end": 0.02})
  with pytest.raises(ValueError, match="noise schedule"):
    personalize.personalize(video, other_betas)
  # A schedule of another length failed in numpy's broadcast.
  shorter = dataclasses.replace(dreambooth, scheduler={**dreambooth.scheduler,
                                                       "num_train_timesteps": 500})
  with pytest.raises(ValueError, match=r"its noise schedule has 500 steps, the video "
                     r"model's 1000 \(scheduler num_train_timesteps\)"):
    personalize.personalize(video, shorter)
  # A class-conditional UNet without a text encoder runs attn2 on its own tokens: an
  # image UNet whose attn2 learnt text must not slip in where the shapes agree.
  classes = lambda m, **kw: dataclasses.replace(m, unet_config=dataclasses.replace(
      m.unet_config, num_class_embeds=3), **kw)
  with pytest.raises(ValueError, match=r"its UNet is called with a text context, the video "
                     r"model's with no context \(attn2 attends to x itself\)"):
    personalize.personalize(classes(video, text_config=None), classes(dreambooth))
  # 'vae' also swaps the spatial autoencoder and keeps a temporal decoder's layers.
  dec = personalize.personalize(pretrained.load(folders["decoder_model"]), dreambooth,
                                ("vae",))
  flat = traverse_util.flatten_dict(dec.params["vae"])
  ref = traverse_util.flatten_dict(dreambooth.params["vae"])
  assert any(partition.is_temporal(k) for k in flat)
  for k, v in flat.items():
    if not partition.is_temporal(k):
      np.testing.assert_array_equal(v, ref[k])


def test_personalising_with_a_video_model_takes_its_image_layers(folders):
  # The "image" checkpoint may be a video model itself (another export): its temporal
  # layers are left out, the result keeps the target's.
  video = pretrained.load(folders["predictor_model"])
  out = personalize.personalize(video, pretrained.load(folders["keyframe_model"]))
  flat, target = (traverse_util.flatten_dict(m.params["unet"]) for m in (out, video))
  assert flat.keys() == target.keys()
  _, phi = partition.split(out.params["unet"])
  for path, leaf in traverse_util.flatten_dict(phi).items():
    np.testing.assert_array_equal(leaf, target[path])


def test_personalisation_mismatch_names_path_and_shapes(folders, tmp_path):
  config = tiny_image_config(seed=3)
  config.unet.block_out_channels = (24,)  # another base architecture
  other = pretrained.random_image_ldm(config)
  pretrained.save(tmp_path / "other", other)
  with pytest.raises(ValueError) as err:
    personalize.load_personalized(folders["keyframe_model"], tmp_path / "other")
  msg = str(err.value)
  assert "shape mismatch: conv_in/kernel is (3, 3, 4, 24)" in msg, msg
  assert "the model expects (3, 3, 4, 16)" in msg and str(tmp_path / "other") in msg
  # The same error through the chain's loader (--image_checkpoint).
  with pytest.raises(ValueError, match="conv_in/kernel"):
    generate.load_chain(keyframe_model=folders["keyframe_model"],
                        image_checkpoint=str(tmp_path / "other"))


def test_personalisation_refuses_the_same_shapes_computing_otherwise():
  # Another head count or VAE scale keeps every parameter shape: only the configs tell.
  image = pretrained.random_image_ldm(tiny_image_config())
  video = video_model(image, TemporalConfig(), 1)
  db = pretrained.random_image_ldm(tiny_image_config(seed=11))
  for part, field, changed, said in (
      ("unet", "unet_config", dict(num_heads=1), "its UNet config differs"),
      ("text_encoder", "text_config", dict(num_attention_heads=1),
       "its text encoder config differs.*num_attention_heads"),
      ("vae", "vae_config", dict(scaling_factor=0.5),
       "its autoencoder config differs.*scaling_factor")):
    other = dataclasses.replace(db, **{field: dataclasses.replace(getattr(db, field),
                                                                  **changed)})
    with pytest.raises(ValueError, match=said):
      personalize.personalize(video, other, part)  # (one name: one part)
  # A text encoder of other leaves under the same config.
  text = {**db.params["text_encoder"], "final_layer_norm": {"scale": np.ones(3, np.float32)}}
  with pytest.raises(ValueError, match="final_layer_norm"):
    personalize.personalize(video, dataclasses.replace(
        db, params={**db.params, "text_encoder": text}), ("text_encoder",))
  no_text = dataclasses.replace(db, params={k: v for k, v in db.params.items()
                                            if k != "text_encoder"})
  with pytest.raises(ValueError, match="has no 'text_encoder' parameters"):
    personalize.personalize(video, no_text, ("text_encoder",))


# --- the chain --------------------------------------------------------------------------------

def test_full_chain_writes_the_planned_video(folders, tmp_path, monkeypatch):
  # 8 x 16 (height and width told apart) -> 32 x 64 after the x4 upsampler.
  options = generate.GenerateOptions(prompt="a road at night", num_frames=70,
                                     **{**FAST, "width": 16})
  out = tmp_path / "video.mp4"
  notes = []
  fed = {}  # frames pushed into the decoder's and the upsampler's chunkers

  overlaps = []

  class Counted(streaming.OverlapChunker):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      overlaps.append(self.overlap)

    def push(self, frames):
      fed[id(self)] = fed.get(id(self), 0) + frames.shape[1]
      return super().push(frames)

  monkeypatch.setattr(streaming, "OverlapChunker", Counted)
  # Which model runs which pass, the keys of its windows, the upsampler's first frames.
  passes, keys, firsts = [], [], []
  interpolate_fn, interpolate = generate._interpolate_fn, generate.context_sampling.interpolate
  upsample = generate.upsampling.upsample

  def recording_fn(models, name, o, stride, stage_id):
    passes.append((name, stage_id))
    return interpolate_fn(models, name, o, stride, stage_id)

  def recording_interpolate(*args, key, **kwargs):
    keys.append(tuple(np.asarray(jax.random.key_data(key)).ravel()))
    return interpolate(*args, key=key, **kwargs)

  def recording_upsample(*args, first_frame, **kwargs):
    firsts.append(first_frame)
    return upsample(*args, first_frame=first_frame, **kwargs)

  monkeypatch.setattr(generate, "_interpolate_fn", recording_fn)
  monkeypatch.setattr(generate.context_sampling, "interpolate", recording_interpolate)
  monkeypatch.setattr(generate.upsampling, "upsample", recording_upsample)
  result = generate.generate_video(out, options, log=notes.append, **folders)
  assert passes == [("interpolator", 2), ("interpolator2", 3)]
  assert len(keys) > 2 and len(set(keys)) == len(keys)  # no two windows share noise
  # Noise by frame: chunks of 8 + 2 x 2 overlap over the 70 frames start at 0, then
  # every 8 (each emits 8 after its 2 context frames), the last at 70 - 12 = 58.
  assert firsts == [0, 8, 16, 24, 32, 40, 48, 56, 58], firsts
  # Only the video's frames reach them: the 11 past its end were cut before decoding.
  assert sorted(fed.values()) == [70, 70], fed
  assert overlaps == [2, 2]  # decode_overlap, upsample_overlap (no seams between chunks)
  assert notes == [] and result.notes == ()  # nothing skipped
  p = result.plan
  # 70 frames at x16 need K = ceil(69 / 16) + 1 = 6 key frames: the key-frame clip (4)
  # and one prediction round (2 new); 16 * 5 + 1 = 81 frames generated, cut to 70.
  assert (p.num_keys, p.first_clip, p.rounds, p.passes) == (6, 4, 1, 2)
  assert p.generated_frames == 81 and p.frame_factor == 16
  assert p.interp_window == 4  # no training record: keyframes_per_clip
  assert (result.num_frames, result.height, result.width) == (70, 32, 64)  # x 4
  video = video_io.read_video(str(out))
  assert video.shape == (70, 32, 64, 3)
  assert video.std() > 1  # not a constant image
  gif = video_io.read_video(result.gif_path)
  assert gif.shape[1:] == (32, 64, 3) and 1 <= gif.shape[0] <= options.gif_max_frames
  from PIL import Image
  with Image.open(result.gif_path) as im:  # 8 fps: 100 / 8 = 12.5 -> 12 hundredths
    assert im.info["duration"] == 120
  assert not list(tmp_path.glob(".*.partial-*"))  # the writer renamed its temporary file


def test_prediction_rounds_continue_from_the_last_frames_made(folders, monkeypatch):
  # Each round's context is the last num_context key frames made so far: the end of the
  # key-frame clip for round 1 (a clip longer than the context), and for later rounds
  # the frames of several rounds where each makes fewer new ones than the context.
  from videoldm_jax.pipelines import context_sampling
  models = generate.load_chain(keyframe_model=folders["keyframe_model"],
                               predictor_model=folders["predictor_model"])
  contexts, real = [], context_sampling.predict
  monkeypatch.setattr(context_sampling, "predict", lambda cm, context, *a, **k: (
      contexts.append(np.asarray(context)), real(cm, context, *a, **k))[1])

  class Bar:
    def update(self, n):
      pass

  for s in (2, 3):  # (3 of 4 predictor frames known: one new frame per round)
    contexts.clear()
    o = generate.GenerateOptions(num_frames=8, **{**FAST, "keyframes_per_clip": 3,
                                                  "predictor_frames": 4, "num_context": s})
    p = generate.plan(models, o)
    made = np.concatenate([np.asarray(x) for x in generate._key_frames(models, o, p, Bar())],
                          axis=1)
    assert made.shape[1] == 8 and len(contexts) == p.rounds == {2: 3, 3: 5}[s]
    produced = p.first_clip
    for context in contexts:
      assert context.shape[1] == min(s, produced)
      np.testing.assert_array_equal(context, made[:, produced - context.shape[1]:produced])
      produced += 4 - context.shape[1]
  # A video within the key-frame clip: no round, so a class-conditional predictor
  # needs no label (its conditioning was built after the key frames, and raised).
  pred, tok = models.predictor
  labelled = dataclasses.replace(models, predictor=(dataclasses.replace(
      pred, unet_config=dataclasses.replace(pred.unet_config, num_class_embeds=3)), tok))
  o = generate.GenerateOptions(num_frames=3, **{**FAST, "keyframes_per_clip": 3})
  p = generate.plan(labelled, o)
  assert p.rounds == 0 and [x.shape[1] for x in generate._key_frames(labelled, o, p, Bar())
                            ] == [3]


def test_missing_stages_are_skipped_with_a_note(folders, dreambooth, tmp_path, monkeypatch):
  notes = []
  options = generate.GenerateOptions(num_frames=6, **{**FAST, "keyframes_per_clip": 2})
  result = generate.generate_video(tmp_path / "kf.mp4", options, log=notes.append,
                                   keyframe_model=folders["keyframe_model"])
  # The same video with a personalised theta (--image_checkpoint) is another video.
  personal = generate.generate_video(tmp_path / "db.mp4", options, log=None,
                                     keyframe_model=folders["keyframe_model"],
                                     image_checkpoint=str(dreambooth[1]))
  assert not np.array_equal(video_io.read_video(personal.path),
                            video_io.read_video(result.path))
  text = "\n".join(notes)
  for stage in ("prediction", "interpolation", "decoder", "upsampler"):
    assert f"{stage} stage skipped" in text, text
  assert "key-frame rate" in text and "low) resolution" in text
  assert "convolutional in time" in text  # 6 key frames from one 2-frame-trained clip
  # Key-frame rate, low resolution: 6 key frames are the 6 frames.
  assert result.plan.num_keys == 6 and result.plan.rounds == 0
  assert video_io.read_video(result.path).shape == (6, 8, 8, 3)
  # The same video as .npy holds the frames the mp4 was encoded from: encoding them at
  # crf 0 (byte-identical encodes) decodes to what the chain's crf-0 mp4 decodes to.
  lossless = dataclasses.replace(options, crf=0)
  mp4, npy = (generate.generate_video(tmp_path / f"kf0.{s}", lossless, log=None,
                                      keyframe_model=folders["keyframe_model"])
              for s in ("mp4", "npy"))
  frames = np.load(npy.path)
  assert frames.shape == (6, 8, 8, 3) and frames.dtype == np.uint8
  assert npy.gif_path.endswith("kf0.gif")
  video_io.write_mp4(str(tmp_path / "re.mp4"), frames, crf=0)
  np.testing.assert_array_equal(video_io.read_video(str(tmp_path / "re.mp4")),
                                video_io.read_video(mp4.path))

  notes.clear()
  result = generate.generate_video(
      tmp_path / "pred.mp4", generate.GenerateOptions(num_frames=13, interp_passes=1, **FAST),
      log=notes.append, predictor_model=folders["predictor_model"],
      interpolator_model=folders["interpolator_model"])
  assert any("key-frame stage skipped" in n for n in notes), notes
  assert result.plan.num_keys == 4 and result.plan.generated_frames == 13
  assert video_io.read_video(result.path).shape == (13, 8, 8, 3)

  # A first clip of 1 key frame, shorter than num_context=2: round 1 has 1 context frame
  # and makes 3 new ones, the later rounds 2 each: 1 + 3 + 2 + 2 + 2 = 10 key frames in
  # 4 rounds (not ceil(9 / 2) = 5, whose last would sample and keep nothing).
  rounds = []  # (context, clip) of each prediction round
  predict = generate.context_sampling.predict

  round_keys = []

  def recording_predict(model, context, *args, **kwargs):
    round_keys.append(tuple(np.asarray(jax.random.key_data(kwargs["key"])).ravel()))
    rounds.append((np.asarray(context), np.asarray(predict(model, context, *args,
                                                           **kwargs))))
    return jnp.asarray(rounds[-1][1])

  monkeypatch.setattr(generate.context_sampling, "predict", recording_predict)
  short_first = generate.generate_video(
      tmp_path / "short.npy", generate.GenerateOptions(
          num_frames=10, **{**FAST, "keyframes_per_clip": 1, "predictor_frames": 4}),
      log=None, keyframe_model=folders["keyframe_model"],
      predictor_model=folders["predictor_model"])
  monkeypatch.undo()
  assert (short_first.plan.first_clip, short_first.plan.rounds) == (1, 4)
  assert len(set(round_keys)) == 4  # each round: noise of its own
  # Each round after the first continues from the LAST 2 key frames made so far.
  assert [c.shape[1] for c, _ in rounds] == [1, 2, 2, 2]
  for (context, clip), (next_context, _) in zip(rounds, rounds[1:]):
    made = np.concatenate([context, clip[:, context.shape[1]:]], axis=1)
    np.testing.assert_array_equal(next_context, made[:, -2:])
  assert np.load(short_first.path).shape == (10, 8, 8, 3)

  # Only a second interpolator: it runs both passes. A personalised chain (default
  # parts: the UNet) keeps the decoder folder's VAE.
  chain = generate.load_chain(keyframe_model=folders["keyframe_model"],
                              interpolator2_model=folders["interpolator2_model"],
                              decoder_model=folders["decoder_model"],
                              image_checkpoint=str(dreambooth[1]))
  assert chain.interpolator is not None and chain.interpolator2 is None
  assert chain.paths["interpolator"] == folders["interpolator2_model"]
  assert any("only --interpolator2_model given" in n for n in chain.notes)
  for a, b in zip(jax.tree_util.tree_leaves(chain.decoder.params["vae"]),
                  jax.tree_util.tree_leaves(
                      pretrained.load(folders["decoder_model"]).params["vae"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  # With the VAE among the parts, the decoder takes it too (its image leaves; the
  # temporal ones stay): the other stages' latents are then that VAE's.
  chain = generate.load_chain(keyframe_model=folders["keyframe_model"],
                              decoder_model=folders["decoder_model"],
                              image_checkpoint=str(dreambooth[1]),
                              personalize_parts=("unet", "vae"))
  decoder_vae = traverse_util.flatten_dict(chain.decoder.params["vae"])
  db_vae = traverse_util.flatten_dict(dreambooth[0].params["vae"])
  assert decoder_vae.keys() > db_vae.keys()
  for k, v in db_vae.items():
    np.testing.assert_array_equal(np.asarray(decoder_vae[k]), v, err_msg=str(k))
  with pytest.raises(ValueError, match="key-frame model .* or a prediction model"):
    generate.load_chain(decoder_model=folders["decoder_model"])
  with pytest.raises(ValueError, match="predictor model .*keyframe.*not a context model"):
    generate.load_chain(keyframe_model=folders["keyframe_model"],
                        predictor_model=folders["keyframe_model"])
  with pytest.raises(ValueError, match="multiples of 2 for these models"):  # latent' factor
    generate.generate_video(tmp_path / "odd.mp4", generate.GenerateOptions(
        **{**FAST, "height": 7}), keyframe_model=folders["keyframe_model"], log=None)
  (tmp_path / "out.npy").mkdir()  # found at the final rename, after all the sampling
  with pytest.raises(ValueError, match="out.npy: is a folder"):
    # (the options of the first video: the programs it compiled)
    generate.generate_video(tmp_path / "out.npy", options,
                            keyframe_model=folders["keyframe_model"], log=None)


def test_prompt_and_negative_prompt_condition_their_own_branches(folders):
  model, tokenizer = entry = pretrained.load_with_tokenizer(folders["keyframe_model"])
  cond = generate._conditioning(entry, generate.GenerateOptions(prompt="a red car",
                                                                negative_prompt="blurry"))
  n = model.text_config.max_position_embeddings
  for field, prompt in (("text", "a red car"), ("uncond_text", "blurry")):
    want = sampling.text_fn(model.text_config)({"params": model.params["text_encoder"]},
                                               jnp.asarray(tokenizer([prompt], max_length=n)))
    np.testing.assert_array_equal(np.asarray(cond[field]), np.asarray(want))
  assert np.abs(np.asarray(cond["text"] - cond["uncond_text"])).max() > 1e-3


def test_plan_follows_what_the_models_were_trained_on(folders, tmp_path):
  """Exports record their training clips (`pretrained.training_record`): the
  interpolator's stride and clip set the defaults, a stride or context count the models
  never saw is refused, and other call lengths get a note."""
  models = generate.load_chain(**folders)
  interp, _ = models.interpolator
  # Saved and loaded with the folder (older folders: {}).
  interp.training = {"stage": "interpolator", "num_frames": 8, "interp_stride": 2}
  pretrained.save(tmp_path / "interp", interp)
  assert pretrained.load(tmp_path / "interp").training == interp.training
  assert pretrained.load(folders["keyframe_model"]).training == {}
  models.predictor[0].training = {"stage": "predictor", "num_frames": 4, "max_context": 1}
  models.decoder.decoder_training = {"stage": "decoder", "num_frames": 4}
  options = generate.GenerateOptions(num_frames=20, **{**FAST, "num_context": 1})
  p = generate.plan(models, options)
  # Stride 2 (two passes: x4 frames per key frame), windows of 8 // 2 = 4 key frames.
  assert (p.interp_stride, p.interp_window, p.frame_factor) == (2, 4, 4)
  assert p.notes == ("decoder stage: calls of 12 frames, trained on clips of 4 "
                     "(decode_chunk=8; temporal statistics follow the call length)",)
  # The key-frame model is called on the first clip only: 2 key frames for 5 frames at
  # x4 ((5 - 1) / 4 + 1), fewer than keyframes_per_clip=4 and than it was trained on.
  models.keyframe[0].training = {"stage": "keyframe", "num_frames": 4}
  short = generate.plan(models, dataclasses.replace(options, num_frames=5))
  assert short.first_clip == 2 and short.notes[0] == (
      "keyframe stage: calls of 2 frames, trained on clips of 4 (keyframes_per_clip=4; "
      "temporal statistics follow the call length)")
  models.keyframe[0].training = {}
  # A short video's calls are shorter than the options say: 5 frames at x4 (two x2
  # passes) interpolate 2 key frames (calls of 2 x 2 = 4 frames, not the window's
  # 2 x 4 = 8), and decode / upsample 5 frames.
  models.decoder.decoder_training = {"stage": "decoder", "num_frames": 12}
  notes = generate.plan(models, dataclasses.replace(options, num_frames=5)).notes
  assert "decoder stage: calls of 5 frames, trained on clips of 12" in notes[-1], notes
  assert "interpolator stage: calls of 4 frames, trained on clips of 8" in notes[-2], notes
  # 10 frames at x4 generate 13 (4 key frames); the frames past 10 are cut before the
  # decoder (streaming.Cut): its one call has 10 frames, as it trained, not 12.
  models.decoder.decoder_training = {"stage": "decoder", "num_frames": 10}
  ten = generate.plan(models, dataclasses.replace(options, num_frames=10))
  assert ten.generated_frames == 13 and not any("decoder stage" in n for n in ten.notes)
  models.decoder.decoder_training = {"stage": "decoder", "num_frames": 4}
  # Frame spacing: key frames trained 4 source frames apart, filled in x2 twice (the
  # interpolator reused). An interpolator trained on frames 1 apart fills in key frames
  # 2 apart: noted (the decoder after it, trained on frames 1 apart, would see frames
  # 0.5 apart: a consequence, not noted). Not compared before.
  models.keyframe[0].training = {"stage": "keyframe", "num_frames": 4, "frame_stride": 4}
  interp.training = {**interp.training, "frame_stride": 1}
  models.decoder.decoder_training = {"stage": "decoder", "num_frames": 4, "frame_stride": 1}
  notes = generate.plan(models, options).notes
  assert [n for n in notes if "apart" in n] == [
      "interpolator stage: trained to fill in key frames 2 source frames apart "
      "(frame_stride=1 x interp_stride=2), given key frames 4 apart (the keyframe model's "
      "frame_stride=4): on data of one frame rate, its motion runs at another speed than "
      "it learned"], notes
  # With the interpolator right, a decoder trained on frames 2 apart sees them 1 apart.
  interp.training = {**interp.training, "frame_stride": 2}
  models.decoder.decoder_training = {"stage": "decoder", "num_frames": 4, "frame_stride": 2}
  assert [n for n in generate.plan(models, options).notes if "apart" in n] == [
      "decoder stage: trained on frames 2 source frames apart, used on frames 1 apart (the "
      "interpolator model's frame_stride=2, / 2 per pass): on data of one frame rate, its "
      "motion runs at another speed than it learned"]
  models.decoder.decoder_training = {"stage": "decoder", "num_frames": 4, "frame_stride": 1}
  interp.training = {**interp.training, "frame_stride": 2}
  assert not [n for n in generate.plan(models, options).notes if "apart" in n]
  # Without a second model the interpolator is reused: its second pass fills in key
  # frames 2 apart, trained on 4 apart. Noted as a second model of its record is (it
  # passed silently, the default interp_passes=2 with one interpolator).
  reused = dataclasses.replace(models, interpolator2=None)
  assert [n for n in generate.plan(reused, options).notes if "apart" in n] == [
      "interpolator stage, reused for pass 2, trained to fill in key frames 4 source "
      "frames apart (frame_stride=2 x interp_stride=2), given key frames 2 apart (the "
      "interpolator model's frame_stride=2): on data of one frame rate, its motion runs "
      "at another speed than it learned"]
  models.keyframe[0].training = {}
  models.decoder.decoder_training = {"stage": "decoder", "num_frames": 4}
  # Options checked before anything is sampled (they failed after the key frames, or a
  # 0 was taken as "use the default").
  for bad, message in ((dict(interp_steps=0), "interp_steps must be >= 1"),
                       (dict(predictor_frames=0), "predictor_frames must be >= 1"),
                       (dict(eta=-1.0), "eta >= 0"), (dict(sampler="euler"), "sampler one of"),
                       (dict(seed=-1), r"seed must be an integer in \[0, 2\^32\), got -1"),
                       # (two SeedSequence words: its ids could be another seed's)
                       (dict(seed=2 ** 32), r"seed must be an integer in \[0, 2\^32\)"),
                       (dict(gif_max_size=0), "gif_max_size and gif_max_frames must be >= 1"),
                       (dict(upsampler_noise_level=400), r"upsampler_noise_level must be in "
                        r"\[0, 350\)"),
                       (dict(duration=float("nan"), num_frames=None), "duration must be a "
                        "positive number of seconds, got nan"),
                       # (NaN scales: black frames, and no word)
                       (dict(guidance_scale=float("nan")), "guidance_scale must be a finite "
                        "number, got nan"),
                       (dict(interp_context_scale=float("inf")), "interp_context_scale must "
                        "be a finite number, got inf"),
                       # Step counts off a stage's timestep grid failed in the sampler,
                       # after the stages before it had sampled.
                       (dict(sampler="dpmpp_2m", interp_steps=1000), r"interpolator model "
                        r".*interp_steps=1000: dpmpp_2m: the timestep grid of 1000 steps "
                        r"repeats"),
                       (dict(upsampler_steps=1000), r"upsampler \(.*\), upsampler_steps=1000: "
                        r"timesteps \[1000\] lie outside"),
                       (dict(fps=0.0), "fps must be positive, got 0.0"),
                       (dict(decode_chunk=0), "decode_chunk must be >= 1"),
                       (dict(keyframes_per_clip=0), "keyframes_per_clip must be >= 1, got 0"),
                       (dict(interp_passes=3), "interp_passes must be 0, 1 or 2, got 3"),
                       # S = p: no new frame per round (the rounds' loop never ended)
                       (dict(num_context=4, predictor_frames=4), r"num_context=4 must be in "
                        r"\[0, predictor_frames=4\)")):
    with pytest.raises(ValueError, match=message):
      generate.plan(models, dataclasses.replace(options, **bad))
  # (the model-free ones also alone: the CLI checks them before loading the models)
  with pytest.raises(ValueError, match="fps must be positive, got 0.0"):
    generate.check_options(dataclasses.replace(options, fps=0.0))
  # The GIF preview's delay is 16 bits of 1/100 s: it overflowed after the whole video.
  with pytest.raises(ValueError, match="fps 0.001 is slower than the GIF preview can show"):
    generate.check_options(dataclasses.replace(options, fps=0.001, gif=True))
  generate.check_options(dataclasses.replace(options, fps=0.001, gif=False))
  generate.check_options(dataclasses.replace(options, seed=np.int64(3)))  # (np.arange's)
  generate.check_options(dataclasses.replace(options, num_frames=np.int64(9)))
  # Counts are integers (10.5 frames made 10; True made 1).
  for bad in (dict(num_frames=10.5), dict(steps=True), dict(interp_window=4.0)):
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an integer, got "):
      generate.check_options(dataclasses.replace(options, **bad))
  # 0.29 s at 100 fps is 29 frames (0.29 * 100 = 28.999999999999996: truncated, 28).
  assert generate.plan(models, dataclasses.replace(options, num_frames=None, duration=0.29,
                                                    fps=100.0)).num_frames == 29
  # ... rounded, not rounded up: 0.3 s at 10 fps (3.0000000000000004) is 3 frames.
  assert generate.plan(models, dataclasses.replace(options, num_frames=None, duration=0.3,
                                                    fps=10.0)).num_frames == 3
  # Neither given: one key-frame clip, interpolated (frame_factor (K - 1) + 1 frames).
  one = generate.plan(models, dataclasses.replace(options, num_frames=None))
  assert (one.num_keys, one.rounds) == (options.keyframes_per_clip, 0)
  assert one.num_frames == one.frame_factor * (options.keyframes_per_clip - 1) + 1
  # Without a key-frame model the predictor makes the first clip: predictor_frames long.
  assert generate.plan(dataclasses.replace(models, keyframe=None), dataclasses.replace(
      options, predictor_frames=3, context_scale=1.0)).first_clip == 3
  # An interpolator trained at x4 on 16 frames: windows of 16 // 4 = 4 key frames; a
  # second one trained at another stride than the first is refused.
  x4 = dataclasses.replace(interp, training={"stage": "interpolator", "num_frames": 16,
                                             "interp_stride": 4})
  assert generate.plan(dataclasses.replace(models, interpolator=(x4, models.interpolator[1])),
                       options).interp_window == 4
  with pytest.raises(ValueError, match=r"trained to fill in x4 \(key frames every 4 frames\), "
                     r"asked for interp_stride=2"):
    generate.plan(dataclasses.replace(models, interpolator2=(x4, models.interpolator[1])),
                  options)
  # Context guidance (FAST: context_scale 1.5) against a no-context branch the predictor
  # never trained: noted; at scale 1 that branch is not used.
  models.predictor[0].training = {**models.predictor[0].training, "no_context_prob": 0.0}
  note = ("predictor stage: context_scale=1.5 guides against its no-context prediction, "
          "which it never trained")
  assert any(n.startswith(note) for n in generate.plan(models, options).notes)
  assert not any("no-context" in n for n in generate.plan(
      models, dataclasses.replace(options, context_scale=1.0)).notes)
  # Sampling with S = 0 uses that branch whatever the scale: num_context=0, or a chain
  # without a key-frame model (its first clip); not noted before. No guidance note then
  # for num_context=0 (no context to guide with).
  s0 = ("predictor stage: samples every round (num_context=0) without context frames, "
        "which it never trained (no clip without context): expect artefacts")
  notes = generate.plan(models, dataclasses.replace(options, num_context=0)).notes
  assert s0 in notes and not any("no-context" in n for n in notes), notes
  no_key = dataclasses.replace(models, keyframe=None)
  assert any(n.startswith("predictor stage: samples the first clip (no key-frame model) "
                          "without context frames") for n in generate.plan(
                              no_key, dataclasses.replace(options, context_scale=1.0)).notes)
  models.predictor[0].training["no_context_prob"] = 1 / 3
  assert not any("no-context" in n for n in generate.plan(models, options).notes)
  assert s0 not in generate.plan(models, dataclasses.replace(options, num_context=0)).notes
  # An epsilon interpolator on a zero-terminal-SNR 'trailing' schedule starts where
  # abar = 0 (NaN): refused by the plan, not after the key frames were sampled.
  interp_model, interp_tok = models.interpolator
  zero_snr = dataclasses.replace(models, interpolator=(dataclasses.replace(
      interp_model, scheduler={**interp_model.scheduler, "rescale_betas_zero_snr": True,
                               "timestep_spacing": "trailing",
                               "prediction_type": "epsilon"}), interp_tok))
  with pytest.raises(ValueError, match=r"interpolator model .*interp_steps=2: ddim: an "
                     r"epsilon-prediction model cannot start at t = 999"):
    generate.plan(zero_snr, options)
  # A label past a class-conditional model's table (NaN embeddings: a black video).
  kf_model, kf_tok = models.keyframe
  conditional = dataclasses.replace(models, keyframe=(dataclasses.replace(
      kf_model, unet_config=dataclasses.replace(kf_model.unet_config, num_class_embeds=3)),
      kf_tok))
  for label in (3, -1):  # (-1 took the table's last row: often the null class)
    with pytest.raises(ValueError, match=f"class_label={label}: .* has classes 0..2"):
      generate.plan(conditional, dataclasses.replace(options, class_label=label))
  # No label for a class-conditional model that samples: refused by the plan, also a
  # predictor after a text key-frame model (found once the key frames were sampled).
  pred_model, pred_tok = models.predictor
  labelled_predictor = dataclasses.replace(models, predictor=(dataclasses.replace(
      pred_model, unet_config=dataclasses.replace(pred_model.unet_config,
                                                  num_class_embeds=3)), pred_tok))
  with pytest.raises(ValueError, match=r"predictor.*: a class-conditional model; give "
                     "class_label"):
    generate.plan(labelled_predictor, options)
  # ... not where it does not sample (a video within the key-frame clip: no rounds).
  assert generate.plan(labelled_predictor, dataclasses.replace(
      options, num_frames=5, predictor_frames=5)).rounds == 0
  for change, said in ((dict(upsampler_noise_level=350), r"in \[0, 350\)"),
                       (dict(num_context=-1), r"num_context=-1 must be in \[0, ")):
    with pytest.raises(ValueError, match=said):
      generate.plan(models, dataclasses.replace(options, **change))
  text_free = dataclasses.replace(conditional, **{stage: (dataclasses.replace(
      getattr(conditional, stage)[0], text_config=None), None)
      for stage in ("keyframe", "predictor")})
  assert any("guidance_scale=2.0 ignored: the models have no text encoder" in n
             for n in generate.plan(text_free, dataclasses.replace(options, class_label=1)).notes)
  # ... unless it was trained with label dropout: guidance against its null class.
  nulled = dataclasses.replace(text_free, keyframe=(dataclasses.replace(
      text_free.keyframe[0], training={"null_class_label": 2}), None))
  notes = generate.plan(nulled, dataclasses.replace(options, class_label=1)).notes
  # (the predictor, not class-conditional and text-free, samples unguided: said)
  assert [n for n in notes if "guidance_scale" in n] == [
      "guidance_scale=2.0: the predictor model samples unguided (no text encoder, and no "
      "null class: not class-conditional or trained without label dropout)"], notes
  # Asking for the null class itself: unconditional samples, said.
  assert "class_label=2 is the null class (no class) of the keyframe model: " \
      "unconditional samples, unguided" in generate.plan(
          nulled, dataclasses.replace(options, class_label=2)).notes
  # A text model's null class (here the interpolator's) leaves guidance by the prompt.
  interp, interp_tok = models.interpolator
  both = dataclasses.replace(nulled, interpolator=(dataclasses.replace(
      interp, unet_config=dataclasses.replace(interp.unet_config, num_class_embeds=3),
      training={**interp.training, "null_class_label": 2}), interp_tok))
  assert [n for n in generate.plan(both, dataclasses.replace(options, class_label=2)).notes
          if "is the null class" in n] == [
      "class_label=2 is the null class (no class) of the keyframe model: unconditional "
      "samples, unguided", "class_label=2 is the null class (no class) of the interpolator "
      "model: no class condition; guidance follows the prompt alone"]
  # ... but only where it samples: a video within the key-frame clip has no rounds.
  short = generate.plan(nulled, dataclasses.replace(options, class_label=1, num_frames=5))
  assert short.rounds == 0 and not any("guidance_scale" in n for n in short.notes)
  assert any("class_label=1 ignored" in n for n in generate.plan(
      models, dataclasses.replace(options, class_label=1)).notes)
  assert "eta=0.5 ignored: only the ddim sampler takes it (sampler=dpmpp_2m)" in \
      generate.plan(models, dataclasses.replace(options, eta=0.5, sampler="dpmpp_2m")).notes
  assert not any("eta=" in n for n in generate.plan(
      models, dataclasses.replace(options, eta=0.5, sampler="ddim")).notes)
  with pytest.raises(ValueError, match="trained to fill in x2 .* interp_stride=4"):
    generate.plan(models, dataclasses.replace(options, interp_stride=4))
  with pytest.raises(ValueError, match="num_context=2: .* trained with at most 1 context"):
    generate.plan(models, dataclasses.replace(options, num_context=2))
  # A predictor and an interpolator swapped between the flags (both context models)
  # passed every record check.
  swapped = dataclasses.replace(models, predictor=models.interpolator,
                                interpolator=models.predictor)
  with pytest.raises(ValueError, match=r"an export of the interpolator stage, given as the "
                     r"predictor \(--predictor_model\)"):
    generate.plan(swapped, options)
  # A model the passes asked for never call is loaded and checked for nothing: said.
  assert any(n.startswith("interpolator2 model ") and n.endswith("unused: interp_passes=1")
             for n in generate.plan(models, dataclasses.replace(options,
                                                                interp_passes=1)).notes)
  # Options of a stage the chain does not run: said, not silently dropped.
  none = dataclasses.replace(options, interp_passes=0, interp_window=3, interp_steps=2,
                             upsampler_steps=3, upsampler_noise_level=20)
  notes = generate.plan(dataclasses.replace(models, upsampler=None), none).notes
  assert "interp_window=3, interp_steps=2 ignored: the chain runs no interpolation" in notes
  assert "upsampler_steps=3, upsampler_noise_level=20 ignored: the chain runs no " \
      "upsampler" in notes
  assert not any("ignored: the chain runs no" in n for n in generate.plan(
      models, dataclasses.replace(options, interp_steps=2)).notes)
  # A video the first clip covers makes no prediction round: no note on its calls.
  once = generate.plan(models, dataclasses.replace(options, num_frames=5, predictor_frames=5))
  assert once.rounds == 0 and not any(n.startswith("predictor stage") for n in once.notes)
  # An image upsampler (no temporal layers) is called without overlap and gets no note
  # on temporal statistics.
  is_upsampler_note = lambda n: n.startswith("upsampler stage")
  models.upsampler.training = {"stage": "upsampler", "num_frames": 4}
  assert any(map(is_upsampler_note, generate.plan(models, options).notes))
  image_upsampler = dataclasses.replace(models, upsampler=dataclasses.replace(
      models.upsampler, config=models.upsampler.config.replace(temporal=None)))
  assert not any(map(is_upsampler_note, generate.plan(image_upsampler, options).notes))
  models.upsampler.training = {}
  # A stage trained on another autoencoder's latents: same shapes, other encoder weights
  # (a decoder stage run without the key-frame model's image model).
  decoder = models.decoder
  encoder = traverse_util.flatten_dict(decoder.params["vae"]["encoder"])
  first = sorted(encoder)[0]
  encoder[first] = np.asarray(encoder[first]) + 1e-3
  vae = {**decoder.params["vae"], "encoder": traverse_util.unflatten_dict(encoder)}
  other = dataclasses.replace(models, decoder=dataclasses.replace(
      decoder, params={**decoder.params, "vae": vae}))
  with pytest.raises(ValueError, match=r"decoder model .*encoder differs from the "
                     r"key-frame model's \(vae/encoder/" + "/".join(first)):
    chain_models.check_chain(other)
  # The same encoder, latents shifted otherwise: another latent space too.
  shifted = dataclasses.replace(models, decoder=dataclasses.replace(
      decoder, vae_config=dataclasses.replace(decoder.vae_config, shift_factor=0.5)))
  with pytest.raises(ValueError, match=r"decoder model .*latent space .* differs"):
    chain_models.check_chain(shifted)


def test_refusals_of_a_default_say_where_it_came_from(folders):
  """A predictor clip or interpolation window taken from keyframes_per_clip (or the
  interpolator's record) is named as a default: the user set neither, and was told
  'interp_window must be >= 2 key frames, got 1'."""
  models = generate.load_chain(**folders, weights=False)
  refused = lambda said: pytest.raises(ValueError, match=said)
  with refused(said=r"num_context=2 must be in \[0, predictor_frames=2\) \(predictor_"
               r"frames defaults to keyframes_per_clip=2; give it\)"):
    generate.plan(models, generate.GenerateOptions(**{**FAST, "keyframes_per_clip": 2}))
  with refused(said=r"interp_window must be >= 2 key frames, got 1 \(its default: "
               r"keyframes_per_clip=1\); give interp_window"):
    generate.plan(models, generate.GenerateOptions(
        num_frames=40, **{**FAST, "keyframes_per_clip": 1, "predictor_frames": 4}))
  models.interpolator[0].training = {"stage": "interpolator", "num_frames": 4,
                                     "interp_stride": 4}
  with refused(said=r"got 1 \(its default: the interpolator's training clip of 4 frames "
               r"// interp_stride=4\)"):
    generate.plan(models, generate.GenerateOptions(num_frames=40, **FAST))
  # Given ones are named as given (check_options refuses interp_window=1 itself).
  with refused(said=r"predictor_frames=3\)$"):
    generate.plan(models, generate.GenerateOptions(
        **{**FAST, "predictor_frames": 3, "num_context": 3}))


def test_cli_flags_reach_the_generation_options():
  # Every option-changing flag set to a value other than its default, read back from
  # the options the CLI builds (no model loaded): a dropped flag (say --nogif, whose
  # preview was written all the same) keeps the default.
  flag_values = dict(
      prompt="p", negative_prompt="n", class_label=3, num_frames=40, fps=12.0, height=32,
      width=48, sampler="dpmpp_2m", steps=9, eta=0.5, guidance_scale=3.0, context_scale=2.0,
      keyframes_per_clip=6, predictor_frames=5, num_context=1, interp_passes=1,
      interp_stride=2, interp_window=3, interp_steps=4, interp_guidance_scale=1.5,
      interp_context_scale=1.25, decode_chunk=8, decode_overlap=1, upsampler_steps=3,
      noise_level=11, upsample_chunk=6, upsample_overlap=1, crf=0, gif=False,
      gif_max_frames=12, gif_max_size=64, progress=False)
  code = ("import dataclasses, json, sys\n"
          "from absl import flags\n"
          "from videoldm_jax.cli import generate\n"
          "flags.FLAGS(['videoldm-generate'] + sys.argv[1:])\n"
          "print(json.dumps(dataclasses.asdict(generate.options(7))))\n")

  def options(values):
    args = [f"--{k}={v}" if not isinstance(v, bool) else f"--{'' if v else 'no'}{k}"
            for k, v in values.items()]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)

  got = options(flag_values)
  renamed = {"noise_level": "upsampler_noise_level"}
  assert got == {**{renamed.get(k, k): v for k, v in flag_values.items()}, "seed": 7,
                 "duration": None}
  defaults = {f.name: f.default for f in dataclasses.fields(generate.GenerateOptions)}
  assert [k for k in got if got[k] == defaults[k]] == ["duration"]
  assert options({"duration": 2.5})["duration"] == 2.5


def test_cli_seeds_and_notes(folders, tmp_path):
  """videoldm-generate: one video per seed, the notes on skipped stages once."""
  from videoldm_jax.cli import seed_outputs
  # One seed writes --output itself; several, one file per seed beside it.
  assert seed_outputs(Path("out/v.mp4"), [7]) == [Path("out/v.mp4")]
  assert seed_outputs(Path("out/v.mp4"), [3, 4]) == [Path("out/v_seed3.mp4"),
                                                       Path("out/v_seed4.mp4")]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.generate",
       f"--keyframe_model={folders['keyframe_model']}",
       f"--decoder_model={folders['decoder_model']}", "--prompt=a road", "--seeds=3,4",
       "--height=8", "--width=8", "--steps=1", "--keyframes_per_clip=2", "--duration=0.5",
       "--fps=8", "--noprogress", f"--output={tmp_path / 'cli.mp4'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = proc.stderr
  assert err.count("prediction stage skipped") == 1, err
  assert "upsampler stage skipped" in err and "decoder stage skipped" not in err
  for seed in (3, 4):
    assert video_io.read_video(str(tmp_path / f"cli_seed{seed}.mp4")).shape == (4, 8, 8, 3)
    assert (tmp_path / f"cli_seed{seed}.gif").is_file()
  a, b = (video_io.read_video(str(tmp_path / f"cli_seed{s}.mp4")) for s in (3, 4))
  assert not np.array_equal(a, b)
  # An unsupported output is refused before any model is loaded.
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.generate", "--keyframe_model=/nonexistent",
       f"--output={tmp_path / 'cli.avi'}"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode != 0 and "cli.avi: expected a .mp4 or .npy path" in proc.stderr, \
      proc.stderr[-3000:]
  # No seed (nothing would be written, exit 0) or a repeated one (a file overwritten).
  for seeds in ("--seeds=", "--seeds=3,3", "--seeds=-1", "--seeds=1,4294967296"):
    proc = subprocess.run(
        [sys.executable, "-m", "videoldm_jax.cli.generate", "--keyframe_model=/nonexistent",
         seeds], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    said = ("in [0, 2^32)" if "-1" in seeds or "429" in seeds
            else "distinct and at least one")
    assert proc.returncode != 0 and f"--seeds must be {said}" in proc.stderr, \
        proc.stderr[-3000:]
  # Personalisation flags that would do nothing, silently; a stride below 2; options no
  # model decides (found after every model had loaded: minutes for SD-sized ones).
  for extra, said in ((["--interp_stride=1"], "--interp_stride must be >= 2, got 1"),
                      (["--fps=0"], "fps must be positive, got 0.0"),
                      (["--steps=0"], "steps must be >= 1"),
                      (["--crf=60"], "crf must be an integer in [0, 51], got 60"),
                      (["--personalize_parts=vae"], "give --image_checkpoint too"),
                      (["--image_checkpoint=/x", "--personalize_parts="],
                       "--personalize_parts is empty")):
    proc = subprocess.run(
        [sys.executable, "-m", "videoldm_jax.cli.generate", "--keyframe_model=/nonexistent",
         *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and said in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_cli_refuses_what_the_models_configs_decide_before_their_weights(folders, tmp_path):
  """The plan's refusals (sizes, context counts, step grids) and `check_chain`'s (a model
  of the wrong kind) come from the folders' configs, before the weights load: they came
  after every model had loaded (minutes for SD-sized exports), the plan's as a
  traceback."""
  import shutil
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # Folders without their weights: only their configs can be read.
  bare = {}
  for name in ("keyframe", "predictor"):
    bare[name] = tmp_path / name
    bare[name].mkdir()
    shutil.copy(Path(folders[f"{name}_model"]) / "model_index.json", bare[name])
  for extra, said in ((["--height=7"], "height and width must be positive multiples of 2"),
                      (["--num_context=4"], "num_context=4 must be in [0, predictor_frames=4)"),
                      (["--steps=1001"], "steps=1001: num_steps must be in [1, 1000]"),
                      # (the last --predictor_model given wins: a key-frame export there)
                      ([f"--predictor_model={bare['keyframe']}"],
                       "not a context model (no temporal_config.context_frames)")):
    proc = subprocess.run(
        [sys.executable, "-m", "videoldm_jax.cli.generate",
         f"--keyframe_model={bare['keyframe']}", f"--predictor_model={bare['predictor']}",
         "--keyframes_per_clip=4", "--height=8", "--width=8", *extra,
         f"--output={tmp_path / 'v.mp4'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and said in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  # The same in videoldm-sample and videoldm-sample-image.
  for cli, out, extra, said in (
      ("sample", "s.mp4", "--height=7", "height and width must be multiples of 2 for this "
       "model"),
      ("sample_image", "s.png", "--steps=1001", "steps=1001: num_steps must be in [1, 1000]")):
    proc = subprocess.run(
        [sys.executable, "-m", f"videoldm_jax.cli.{cli}", f"--model={bare['keyframe']}",
         "--height=8", "--width=8", extra, f"--output={tmp_path / out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and said in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("n, window", [(7, 3), (8, 3), (8, 4), (9, 4)])
def test_interpolation_windows_share_the_boundary_key_frame(n, window):
  """Known key frames land exactly every stride frames across window borders."""
  calls, indices = [], []

  def fake_interpolate(keys, index, first):  # keys at 0, 4, ...; in-between frames = -1
    assert keys[0, 0, 0, 0, 0] == first  # key k holds the value k
    calls.append(np.asarray(keys)[0, :, 0, 0, 0].tolist())
    indices.append(index)  # (each window's noise is seeded by it)
    m = keys.shape[1]
    out = -np.ones((1, 4 * (m - 1) + 1, 1, 1, 1), np.float32)
    out[:, ::4] = keys
    return jax.numpy.asarray(out)

  stage = streaming.Interpolation(fake_interpolate, 4, window=window)
  keys = np.arange(n, dtype=np.float32).reshape(1, n, 1, 1, 1)
  outs = [stage.push(keys[:, i:i + 2]) for i in range(0, n, 2)] + [stage.flush()]
  frames = np.concatenate([np.asarray(o) for o in outs if o is not None], axis=1)[0, :, 0, 0, 0]
  assert frames.shape == (4 * (n - 1) + 1,)
  np.testing.assert_array_equal(frames[::4], np.arange(n))   # every key once, in place
  assert (frames[np.arange(4 * (n - 1) + 1) % 4 != 0] == -1).all()
  # Windows [0..2], [2..4], [4..6]; with 8 keys the last one ([6, 7] new) reaches back
  # to 5, so every call has the same shape; with 7 the last key (6) ends a window.
  # With 4 keys a window: [0..3], [3..6], and the last reaches back from 7 (8) to 4 (5).
  windows = {(7, 3): [[0, 1, 2], [2, 3, 4], [4, 5, 6]],
             (8, 3): [[0, 1, 2], [2, 3, 4], [4, 5, 6], [5, 6, 7]],
             (8, 4): [[0, 1, 2, 3], [3, 4, 5, 6], [4, 5, 6, 7]],
             (9, 4): [[0, 1, 2, 3], [3, 4, 5, 6], [5, 6, 7, 8]]}[n, window]
  assert calls == windows and indices == list(range(len(windows)))


def test_sink_keeps_the_first_gif_frames_downscaled_and_cuts_the_video(tmp_path):
  path = str(tmp_path / "v.npy")
  with video_io.NpyWriter(path, 5) as writer:
    sink = streaming.Sink(writer, num_frames=5, gif_frames=3, gif_size=4)
    for i in range(3):  # 6 frames of 8x8, the last one past the video's end
      sink.push(jax.numpy.full((1, 2, 8, 8, 3), i / 2 - 0.5))
  assert np.load(path).shape == (5, 8, 8, 3)
  assert len(sink.preview) == 3 and all(f.shape == (4, 4, 3) for f in sink.preview)
  # -0.5 -> 64 and 0 -> 128 (to_uint8 rounds (x + 1) * 127.5): frames 0, 1 of chunk 0, 2 of 1
  assert [int(f[0, 0, 0]) for f in sink.preview] == [64, 64, 128]


def test_frames_past_the_video_end_are_not_decoded():
  # 8 key frames at x4 make 29 frames; a 26-frame video decoded all 29 (the demo: 33
  # for 32) and cut them only when writing.
  seen = []

  def interpolate(keys, index, first):
    n = keys.shape[1]
    return jax.numpy.repeat(keys, 4, axis=1)[:, :4 * (n - 1) + 1]

  def decode(frames, index, first):
    seen.extend(range(first, first + frames.shape[1]))
    return frames

  got = []

  class Collect:
    def push(self, frames):
      got.append(np.asarray(frames))

    def flush(self):
      return None

  pipeline = streaming.Pipeline([streaming.Interpolation(interpolate, 4, window=3),
                                 streaming.Cut(26),
                                 streaming.OverlapChunker(decode, chunk=4, overlap=1),
                                 Collect()])
  keys = np.arange(8, dtype=np.float32).reshape(1, 8, 1)
  for i in range(0, 8, 3):
    pipeline.push(jax.numpy.asarray(keys[:, i:i + 3]))
  pipeline.flush()
  frames = np.concatenate(got, axis=1)[0, :, 0]
  np.testing.assert_array_equal(frames, np.repeat(np.arange(8), 4)[:26])
  assert max(seen) == 25 and set(seen) == set(range(26))


@pytest.mark.parametrize("length, chunk, overlap, push", [(23, 5, 1, 3), (23, 4, 0, 5),
                                                           (6, 5, 1, 2), (40, 3, 2, 7)])
def test_overlap_chunker_matches_whole_video_processing(length, chunk, overlap, push):
  """With a temporal filter no wider than the overlap, chunked = whole-video output;
  every call has the same number of frames (one compiled shape)."""
  sizes = []

  def blur(x, index, first):  # a (2 overlap + 1)-tap temporal filter, zero padding at ends
    sizes.append(x.shape[1])
    np.testing.assert_array_equal(x, video[:, first:first + x.shape[1]])
    p = jax.numpy.pad(x, ((0, 0), (overlap, overlap), (0, 0)))
    n = x.shape[1]
    return sum((k + 1) * p[:, k:k + n] for k in range(2 * overlap + 1))

  video = jax.numpy.asarray(np.random.default_rng(0).standard_normal((1, length, 2)))
  stage = streaming.OverlapChunker(blur, chunk=chunk, overlap=overlap)
  outs = [stage.push(video[:, i:i + push]) for i in range(0, length, push)]
  outs.append(stage.flush())
  chunked = np.concatenate([np.asarray(o) for o in outs if o is not None], axis=1)
  whole = np.asarray(blur(video, 0, 0))
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
  assert set(sizes[:-1]) == {min(length, chunk + 2 * overlap)}


def test_mp4_writer_streams_chunks_and_closes_atomically(tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "w.mp4")
  with video_io.Mp4Writer(path, fps=12) as writer:
    for n in (3, 1, 5):
      writer.append(rng.integers(0, 256, (n, 15, 20, 3), dtype=np.uint8))
      assert not os.path.exists(path)  # only the temporary file exists until close
    with pytest.raises(ValueError, match="first chunk was 15x20"):
      writer.append(np.zeros((1, 16, 20, 3), np.uint8))
  assert writer.num_frames == 9 and writer.size == (16, 20)  # odd height padded
  assert video_io.read_video(path).shape == (9, 16, 20, 3)
  # An exception inside the block discards the file; the old one stays.
  with pytest.raises(RuntimeError):
    with video_io.Mp4Writer(path) as writer:
      writer.append(np.zeros((2, 8, 8, 3), np.uint8))
      raise RuntimeError("stop")
  assert video_io.read_video(path).shape == (9, 16, 20, 3)
  assert os.listdir(tmp_path) == ["w.mp4"]
  with pytest.raises(ValueError, match="no frames"):
    video_io.Mp4Writer(str(tmp_path / "empty.mp4")).close()


def test_npy_writer_streams_exact_frames_and_closes_atomically(tmp_path):
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (9, 15, 20, 3), dtype=np.uint8)
  path = str(tmp_path / "w.npy")
  with video_io.open_writer(path, num_frames=9, fps=12, crf=18) as writer:
    assert isinstance(writer, video_io.NpyWriter)
    for a, b in ((0, 3), (3, 4), (4, 9)):
      writer.append(video[a:b])
      assert not os.path.exists(path)  # only the temporary file exists until close
    with pytest.raises(ValueError, match="first chunk was 15x20"):
      writer.append(np.zeros((1, 16, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="10 frames appended, but the file was opened for 9"):
      writer.append(video[:1])
  assert writer.size == (15, 20)  # no padding: no codec
  np.testing.assert_array_equal(np.load(path), video)
  # Too few frames, or an exception inside the block: nothing written, the old file stays.
  with pytest.raises(ValueError, match="8 of 9 frames were appended; nothing written"):
    with video_io.NpyWriter(path, 9) as writer:
      writer.append(video[:8])
  assert os.listdir(tmp_path) == ["w.npy"]  # (the full-size temporary file is gone)
  with pytest.raises(RuntimeError):
    with video_io.NpyWriter(path, 2) as writer:
      writer.append(video[:2])
      raise RuntimeError("stop")
  np.testing.assert_array_equal(np.load(path), video)
  assert os.listdir(tmp_path) == ["w.npy"]
  with pytest.raises(ValueError, match=r"w\.avi: unsupported output suffix '\.avi'"):
    video_io.open_writer(str(tmp_path / "w.avi"), 9)


# --- memory ---------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from videoldm_jax.pipelines import generate

    def status_kib(field):
      for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
          return int(line.split()[1])

    def reset_peak():
      # Linux >= 4.0: writing "5" resets the peak RSS (VmHWM) to the current RSS.
      try:
        with open("/proc/self/clear_refs", "w") as f:
          f.write("5")
        return True
      except OSError:
        return False

    folders, options, lengths, out = json.loads(sys.argv[1])
    models = generate.load_chain(**folders)
    report = {}
    for name, num_keys in lengths:
      f = 4 ** options["interp_passes"]
      opts = generate.GenerateOptions(**{**options, "num_frames": f * (num_keys - 1) + 1})
      reset = reset_peak()
      before = status_kib("VmRSS")
      res = generate.generate_video(out + f"/{name}.mp4", opts, models=models, log=None)
      report[name] = dict(frames=res.num_frames, keys=res.plan.num_keys, before=before,
                          peak=status_kib("VmHWM"), reset=reset, hw=[res.height, res.width])
    print("REPORT " + json.dumps(report))
""")


def test_memory_is_flat_in_the_video_length(tmp_path_factory, tmp_path):
  """4x and 16x the key-frame clip length: the peak host memory must not grow.

  Method (robust to compilation and allocator noise): one subprocess loads the models
  and makes a warm-up video of the 4x length (compiling every program: all runs then
  use the same shapes), then for each length resets the kernel's peak-RSS counter
  (/proc/self/clear_refs) and reads VmHWM after the run. RSS counts XLA's buffers,
  which tracemalloc would not see. glibc's adaptive mmap threshold is pinned
  (MALLOC_MMAP_THRESHOLD_): otherwise freed large buffers stay in malloc's arenas and
  the resident size drifts with the allocation history (measured: +/- 100 MB between
  identical runs), while pinned it follows the live memory to a few MB. Frames are
  large (128x128 through an f16 VAE) so that holding the 16x video would show: as
  float32 it is ~50 MB.
  """
  # A pixel-heavy but cheap decoder: 5 levels of 8 channels (f16).
  folders = save_stage_folders(tmp_path_factory.mktemp("mem"),
                               tiny_image_config(vae_channels=(8, 8, 8, 8, 8)),
                               upsampler=False, interpolator2=False)
  options = {**FAST, "height": 128, "width": 128, "steps": 1, "guidance_scale": 1.0,
             "context_scale": 1.0, "interp_passes": 1, "decode_chunk": 8, "gif": False}
  t = options["keyframes_per_clip"]
  # Each length twice (x4b, x16b): the stricter check below takes each length's
  # smaller growth. A video held in memory grows both runs; a loaded machine's noise
  # seldom hits both (the 16x run once added 12.4 MB more than the 4x one with the
  # suite's second worker and two more processes beside it, against ~1 MB alone).
  lengths = [("warmup", 4 * t), ("x4", 4 * t), ("x16", 16 * t), ("x4b", 4 * t),
             ("x16b", 16 * t)]
  # One malloc arena as well: glibc opens another arena whenever a thread finds the
  # current one locked, more often on a loaded machine, and the stricter check below
  # failed twice with the suite's second worker and the demo beside it (the 16x run
  # adding ~14 MB more than the 4x one, against ~2 MB alone).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536",
         "MALLOC_ARENA_MAX": "1"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-c", MEMORY_SCRIPT,
       json.dumps([folders, options, lengths, str(tmp_path)])],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.split("REPORT ", 1)[1])
  x4, x16 = report["x4"], report["x16"]
  print("memory (KiB):", json.dumps(report))
  assert (x4["keys"], x16["keys"]) == (4 * t, 16 * t)
  assert (x4["frames"], x16["frames"]) == (4 * (4 * t - 1) + 1, 4 * (16 * t - 1) + 1)
  assert x16["hw"] == [128, 128]
  # The brief's criterion: the peak host memory differs by < 20%.
  assert abs(x16["peak"] - x4["peak"]) < 0.2 * x4["peak"], report
  if all(report[k]["reset"] for k in ("x4", "x16", "x4b", "x16b")):
    # Stricter: what each run adds on top of the resident models and programs is
    # about the same, and the difference is far below the 16x video's float32 size.
    video_kib = x16["frames"] * 128 * 128 * 3 * 4 / 1024
    grow = lambda k: report[k]["peak"] - report[k]["before"]
    grow4, grow16 = min(grow("x4"), grow("x4b")), min(grow("x16"), grow("x16b"))
    assert grow16 - grow4 < 0.25 * video_kib, (grow4, grow16, video_kib)


def test_the_chain_copies_its_parameters_to_the_device_once(folders, tmp_path):
  """Host (NumPy) parameters given to a jitted call are copied to the device on every
  call: every denoising step of every window copied the whole UNet (21 ms per 100 MB
  on this CPU; PCIe on a GPU). The chain holds device arrays, and a clip samples with
  no host-to-device copy at all."""
  models = generate.load_chain(**folders)
  entries = [models.keyframe[0], models.predictor[0], models.interpolator[0],
             models.decoder, models.upsampler]
  assert all(isinstance(leaf, jax.Array)
             for e in entries for leaf in jax.tree_util.tree_leaves(e.params))
  from videoldm_jax.pipelines import context_sampling as cs

  def guarded(apply_fn):
    def call(*args, **kwargs):  # each UNet call (every step) may copy nothing to the device
      with jax.transfer_guard_host_to_device("disallow"):
        return apply_fn(*args, **kwargs)
    return call

  host = pretrained.load(folders["predictor_model"])  # (NumPy, as loaded)
  assert not any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(host.params))
  # A prediction round of the chain with FAST's options (test_prediction_rounds_continue_
  # from_the_last_frames_made's clips: the same programs, compiled already).
  cond = generate._conditioning(models.predictor, generate.GenerateOptions(**FAST))
  options = cs.ContextSampleOptions(num_steps=2, context_scale=FAST["context_scale"],
                                    guidance_scale=FAST["guidance_scale"])
  for model in (host, models.predictor[0]):
    cm = cs.ContextModel.from_pretrained(model)
    cm = dataclasses.replace(cm, apply_fn=guarded(cm.apply_fn))
    known = jnp.zeros((1, 4, 4, 4, 4), jnp.float32)
    out = cs.sample_clip(cm, known, jnp.asarray([[1.0, 0.0, 0.0, 0.0]]), options, **cond)
    assert out.shape == known.shape


def test_the_upsamplers_noise_follows_the_videos_seed(monkeypatch):
  # Each --seeds video draws its own upsampler noise (the same seed: the same noise).
  import types
  seen = []
  monkeypatch.setattr(generate.upsampling, "upsample",
                      lambda *a, seed, **k: seen.append(seed) or a[2])
  models = types.SimpleNamespace(upsampler=types.SimpleNamespace(config=None, params=None))
  for seed in (0, 1, 0):
    fn = generate._upsample_fn(models, generate.GenerateOptions(seed=seed, **FAST))
    fn(jnp.zeros((1, 2, 8, 8, 3)), 0, 0)
  assert seen[0] != seen[1] and seen[0] == seen[2]


def test_a_prompt_past_what_the_text_encoder_reads_is_said_to_be_cut(folders, capsys):
  # CLIP reads 75 tokens (this tiny text encoder 14): a longer prompt's end was dropped
  # without a word (diffusers warns, naming the dropped text). The byte-level tokenizer
  # makes a token per character.
  from videoldm_jax.cli import load_to_sample
  long = "a red car, " * 2 + "at night"
  # (With its tokenizer: a configs-only chain, weights=False, has none.)
  models = generate.load_chain(keyframe_model=folders["keyframe_model"])
  for prompt, negative, cut in ((long, "", ["prompt"]), ("a car", long, ["negative_prompt"]),
                                ("a car", "blurry", [])):
    o = generate.GenerateOptions(**{**FAST, "prompt": prompt, "negative_prompt": negative})
    notes = [n for n in generate.plan(models, o).notes if "the text encoder reads" in n]
    assert [n.split()[0] for n in notes] == cut
    if cut == ["prompt"]:  # 8 tokens a repeat: "a red car," and "a red ca" are read
      assert notes[0] == ("prompt is longer than the 14 tokens the text encoder reads; its "
                          "end is ignored: 'r , at night'")
  configs = pretrained.load(folders["keyframe_model"], weights=False)
  options = sampling.SampleOptions(height=8, width=8, num_steps=2, num_frames=4)
  load_to_sample(folders["keyframe_model"], configs, options, "", None, prompt=long)
  assert "note: --prompt is longer than the 14 tokens the text encoder reads" in (
      capsys.readouterr().err)


def test_a_negative_prompt_without_guidance_is_said_to_be_ignored(folders, capsys):
  # At guidance_scale=1 the unconditional branch, which the negative prompt conditions,
  # is not run: the output was the same with or without it, said by no one.
  from videoldm_jax.cli import note_unused_negative
  models = generate.load_chain(keyframe_model=folders["keyframe_model"], weights=False)
  said = "negative_prompt='blurry' ignored: guidance_scale=1 runs no unconditional branch"
  for scale, negative, noted in ((1.0, "blurry", True), (2.0, "blurry", False),
                                 (1.0, "", False)):
    o = generate.GenerateOptions(**{**FAST, "guidance_scale": scale,
                                    "negative_prompt": negative})
    assert (said in generate.plan(models, o).notes) == noted
    note_unused_negative(True, scale, negative)
    assert ("--negative_prompt ignored" in capsys.readouterr().err) == noted
  note_unused_negative(False, 1.0, "blurry")  # (no text encoder: note_unguided's case)
  assert capsys.readouterr().err == ""
