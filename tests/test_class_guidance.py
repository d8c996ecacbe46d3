"""Classifier-free guidance of class-conditional models: labels dropped to the model's
null class in training (with the captions), the null class recorded in exports and
inherited by the next stage, and the samplers guiding against it."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.test_context_stages import TINY, _config
from videoldm_jax import pretrained
from videoldm_jax.models import partition
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.pipelines import context_sampling, generate, sampling
from videoldm_jax.stages import image_ldm, keyframe
from videoldm_jax.train.state import merge
from videoldm_jax.video_ldm import VideoLDM

# Three classes: 0 and 1 for the data, 2 the null class.
CLASSES = {**TINY, "unet": {**TINY["unet"], "num_class_embeds": 3}}
NO_TEXT = {k: v for k, v in CLASSES.items() if k != "text_encoder"}


def _host_batch(labels, frames: int = 2) -> dict:
  rng = np.random.default_rng(0)
  n = len(labels)
  return {"video": rng.integers(0, 256, (n, frames, 8, 8, 3), np.uint8),
          "caption": np.array(["a road"] * n), "labels": np.asarray(labels, np.int32)}


def test_labels_drop_to_the_null_class_together_with_the_captions(tmp_path):
  labels = jnp.arange(8) % 2
  key = jax.random.key(3)
  assert keyframe.drop_labels(labels, None, 1.0, key, 8) is labels  # no null class
  np.testing.assert_array_equal(keyframe.drop_labels(labels, 2, 0.0, key, 8), labels)
  np.testing.assert_array_equal(keyframe.drop_labels(labels, 2, 1.0, key, 8), [2] * 8)
  # Per-frame labels (B*T,) of 2 videos of 4 frames: a video's frames drop together.
  patterns = {tuple(np.asarray(keyframe.drop_labels(labels, 2, 0.5, jax.random.key(s), 2))
                    == 2) for s in range(16)}
  assert patterns == {(a,) * 4 + (b,) * 4 for a in (False, True) for b in (False, True)}

  # The caption and the label of a video are dropped by one draw: the unconditional
  # branch guidance subtracts has neither.
  config = _config("keyframe_tiny", num_frames=2)
  config.random_image_model = ml_collections.ConfigDict(CLASSES)
  config.null_class_label = 2
  setup = keyframe.setup(config, tmp_path / "kf")
  ldm, tokenizer = setup.extra["ldm"], setup.extra["tokenizer"]
  assert ldm.null_class_label == 2
  batch = setup.make_batch(_host_batch([0, 1] * 4))
  params, text = setup.init_params(), ldm.text_encoder()
  uncond = tokenizer([""], max_length=batch["tokens"].shape[1])[0]
  empty = np.asarray(text.apply({"params": params["text_encoder"]}, uncond[None]))[0]
  for seed in range(4):
    k = jax.random.key(seed)
    context = np.asarray(keyframe.text_context(text, params, batch, uncond, 0.5, k,
                                               jnp.float32))
    no_caption = [np.allclose(c, empty, atol=1e-6) for c in context]
    no_label = np.asarray(keyframe.drop_labels(jnp.asarray(batch["labels"]), 2, 0.5, k, 8)) == 2
    assert no_caption == no_label.tolist()

  # In the loss: cond_drop_prob = 1 is the loss of the batch with every label the null
  # class (and every caption empty) at cond_drop_prob = 0 (the same key: the same noise).
  # (One jitted loss per cond_drop_prob: a jit per call compiled the p = 0 one twice.)
  jitted = {p: jax.jit(keyframe.make_stage(ldm, keyframe.KeyframeOptions(
      cond_drop_prob=p, null_class_label=2), uncond).loss_fn) for p in (0.0, 1.0)}
  loss = lambda p, b: float(jitted[p](params, jax.tree_util.tree_map(jnp.asarray, b),
                                      jax.random.key(0))[0])
  tokens_empty = np.broadcast_to(uncond, batch["tokens"].shape)
  nulled = {**batch, "labels": np.full(8, 2, np.int32), "tokens": tokens_empty}
  assert loss(1.0, batch) == loss(0.0, nulled) != loss(0.0, batch)


@pytest.mark.parametrize("name", ["keyframe", "predictor", "interpolator"])
def test_every_stage_drops_a_videos_caption_and_label_by_one_draw(name, tmp_path):
  # The stage's loss at cond_drop_prob = 0.5 is the loss at 0 (the same key: the same
  # noise, times and context masks) of the batch with some videos unconditional, caption
  # AND label: exactly one subset of the 4 videos, nulled in both, reproduces it. Labels
  # and captions dropped by two draws, or labels never dropped, match no subset.
  import itertools
  from videoldm_jax.stages import context, interpolator, predictor
  config = _config(f"{name}_tiny", num_frames=4)
  config.random_image_model = ml_collections.ConfigDict(CLASSES)
  config.null_class_label, config.cond_drop_prob = 2, 0.5
  module = {"keyframe": keyframe, "predictor": predictor, "interpolator": interpolator}[name]
  setup = module.setup(config, tmp_path / name)
  ldm, tokenizer = setup.extra["ldm"], setup.extra["tokenizer"]
  batch = jax.tree_util.tree_map(jnp.asarray, setup.make_batch(_host_batch([0, 1, 1, 0], 4)))
  uncond = tokenizer([""], max_length=batch["tokens"].shape[1])[0]
  options = keyframe.KeyframeOptions(cond_drop_prob=0.0, null_class_label=2)
  if name == "keyframe":
    never_drops = keyframe.make_stage(ldm, options, uncond)
  else:
    mask = (predictor.mask_fn(config.predictor.num_context_probs) if name == "predictor"
            else interpolator.mask_fn(config.interpolator.stride,
                                      config.interpolator.context_drop_prob))
    never_drops = context.make_context_stage(name, ldm, options, uncond, mask)
  params, key = setup.init_params(), jax.random.key(1)
  target = float(jax.jit(setup.stage.loss_fn)(params, batch, key)[0])
  loss = jax.jit(never_drops.loss_fn)
  matches = []
  for dropped in itertools.product([False, True], repeat=4):
    d = jnp.asarray(dropped)
    nulled = {**batch, "labels": jnp.where(d, 2, batch["labels"]),
              "tokens": jnp.where(d[:, None], uncond[None], batch["tokens"])}
    # (to rounding: the two programs fuse differently, ~1e-7; subsets differ by >= 1e-4)
    if abs(float(loss(params, nulled, key)[0]) - target) <= 1e-6 * target:
      matches.append(dropped)
  assert len(matches) == 1 and 0 < sum(matches[0]) < 4, matches


@pytest.mark.parametrize("name", ["keyframe", "predictor", "interpolator"])
def test_training_samples_are_guided_against_the_null_class(name, tmp_path):
  # A text-free class-conditional model guides by its null class alone: the trainer's
  # samples at guidance_scale 4 differ from those at 1 (and are those at 1 when the
  # samplers drop the null class).
  from videoldm_jax.stages import interpolator, predictor
  config = _config(f"{name}_tiny", num_frames=4)
  config.random_image_model = ml_collections.ConfigDict(NO_TEXT)
  config.null_class_label = 2
  config.sample.update(steps=2, num_frames=4, prompts=("", ""))
  module = {"keyframe": keyframe, "predictor": predictor, "interpolator": interpolator}[name]
  setup = module.setup(config, tmp_path / name)
  params = setup.init_params()
  videos = {}
  for scale in (1.0, 4.0):
    config.sample.guidance_scale = scale
    videos[scale] = setup.sample(params, 0)
  assert videos[1.0].shape == (2, 4, 8, 8, 3)
  assert np.abs(videos[4.0].astype(int) - videos[1.0]).max() > 2, name  # (8 to 12)


def test_the_null_class_is_checked_recorded_and_inherited(tmp_path):
  config = _config("image_ldm_tiny", num_frames=2)
  config.random_image_model = ml_collections.ConfigDict(NO_TEXT)
  for bad, match in ((3, r"null_class_label=3: expected one of the UNet's classes 0..2"),
                     (True, r"null_class_label=True: expected a class index")):
    config.null_class_label = bad
    with pytest.raises(ValueError, match=match):
      image_ldm.setup(config, tmp_path / "bad")
  config.null_class_label = 2
  # Without label dropout the null row never trains: guidance would push away from noise.
  drop, config.cond_drop_prob = config.cond_drop_prob, 0.0
  with pytest.raises(ValueError, match=r"cond_drop_prob=0.0: no label is ever dropped"):
    image_ldm.setup(config, tmp_path / "bad")
  config.cond_drop_prob = drop
  setup = image_ldm.setup(config, tmp_path / "image")
  # A data label equal to the null class would train the unconditional branch as a class.
  with pytest.raises(ValueError, match="label 2 is the model's null class"):
    setup.make_batch(_host_batch([0, 2]))
  setup.export(tmp_path / "image_export", setup.init_params())
  assert pretrained.load(tmp_path / "image_export").training["null_class_label"] == 2

  # The key-frame stage on that export: the null class comes from its record.
  kf = _config("keyframe_tiny", num_frames=2)
  kf.image_model = str(tmp_path / "image_export")
  kf_setup = keyframe.setup(kf, tmp_path / "kf")
  assert kf_setup.extra["ldm"].null_class_label == 2
  kf_setup.export(tmp_path / "kf_export", kf_setup.init_params())
  assert pretrained.load(tmp_path / "kf_export").training["null_class_label"] == 2
  kf.null_class_label = 1
  with pytest.raises(ValueError, match="null_class_label=1: .*image_export was trained with "
                     "null class 2"):
    keyframe.setup(kf, tmp_path / "kf2")
  kf.null_class_label = 2  # the recorded one, given again (e.g. by a launch script)
  assert keyframe.setup(kf, tmp_path / "kf2b").extra["ldm"].null_class_label == 2

  # An image model trained without one: its frozen class table has no "no class" row.
  plain = pretrained.random_image_ldm(ml_collections.ConfigDict(NO_TEXT))
  pretrained.save(tmp_path / "plain", plain)
  kf.image_model, kf.null_class_label = str(tmp_path / "plain"), 2
  with pytest.raises(ValueError, match=r"trained without a null class, and its class "
                     r"embedding is frozen \(mode='temporal'\)"):
    keyframe.setup(kf, tmp_path / "kf3")
  kf.mode = "full"  # the class table trains too
  assert keyframe.setup(kf, tmp_path / "kf4").extra["ldm"].null_class_label == 2
  # A record outside the class table (an edited export) is refused, not indexed past.
  pretrained.save(tmp_path / "edited", dataclasses.replace(
      plain, training={"null_class_label": 3}))
  kf.image_model, kf.null_class_label = str(tmp_path / "edited"), None
  with pytest.raises(ValueError, match=r"edited: its training record's null_class_label=3 "
                     r"is not one of the UNet's classes \(unet.num_class_embeds=3\)"):
    keyframe.setup(kf, tmp_path / "kf6")
  # Personalisation swaps the class table: another null class than phi's is refused;
  # an image model without a record (e.g. a converted fine-tune) keeps the video's.
  from videoldm_jax.pipelines.personalize import personalize
  video = pretrained.load(tmp_path / "kf_export")
  image = pretrained.load(tmp_path / "image_export")
  assert personalize(video, dataclasses.replace(image, training={})).training[
      "null_class_label"] == 2
  with pytest.raises(ValueError, match="null class is 1, the video model's 2"):
    personalize(video, dataclasses.replace(image, training={"null_class_label": 1}))
  # (its autoencoder alone takes no class table: no refusal)
  assert personalize(video, dataclasses.replace(image, training={"null_class_label": 1}),
                     parts=("vae",)).training["null_class_label"] == 2
  # Not class-conditional: nothing to drop to.
  text_model = _config("keyframe_tiny", num_frames=2)
  text_model.null_class_label = 0
  with pytest.raises(ValueError, match="is not class-conditional"):
    keyframe.setup(text_model, tmp_path / "kf5")


def test_samplers_guide_against_the_null_class():
  image = pretrained.random_image_ldm(ml_collections.ConfigDict(NO_TEXT))
  with_null = lambda label: dataclasses.replace(image, training={"null_class_label": label})
  options = lambda scale: sampling.SampleOptions(height=8, width=8, num_steps=2,
                                                 guidance_scale=scale, progress=False)
  run = lambda model, scale, labels: np.asarray(sampling.sample_latents(
      model, None, [""] * len(labels), "", options(scale), class_labels=labels))
  assert not sampling.guided(image) and sampling.guided(with_null(2))
  # A caller's initial noise must be the latents' shape (another size was sampled as is).
  with pytest.raises(ValueError, match=r"x_T has shape \(1, 3, 3, 4\), expected \(1, "):
    sampling.sample_latents(image, None, [""], "", options(1.0), class_labels=[0],
                            x_T=jnp.zeros((1, 3, 3, 4)))
  # videoldm-sample(-image) --class_label of the null class: said.
  import contextlib
  import io
  from videoldm_jax.cli import note_null_class
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    note_null_class(with_null(2), 2)
    note_null_class(with_null(2), 1)
    note_null_class(image, 2)
  assert err.getvalue() == ("note: --class_label=2 is the model's null class (no class): "
                            "unconditional samples, unguided\n")
  # A text model's null class is still guided, by the prompt (the negative prompt's
  # branch has the null class too).
  text = pretrained.random_image_ldm(ml_collections.ConfigDict(CLASSES))
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    note_null_class(dataclasses.replace(text, training={"null_class_label": 2}), 2)
  assert err.getvalue() == ("note: --class_label=2 is the model's null class (no class): "
                            "no class condition; guidance follows the prompt alone\n")
  with pytest.raises(ValueError, match=r"null_class_label=3 is not one of the UNet's "
                     r"classes 0..2"):
    sampling.null_class_label(with_null(3))
  # One label per prompt (else the UNet refused the guided batch of twice the size), and
  # both sides multiples of the model's factor, named before sampling.
  with pytest.raises(ValueError, match=r"class_labels: one per prompt, 2, got shape \(3,\)"):
    sampling.sample_latents(image, None, ["", ""], "", options(1.0), class_labels=[0, 1, 0])
  f = sampling.size_multiple(image.unet_config, image.vae_config)
  with pytest.raises(ValueError, match=rf"height and width must be multiples of {f} for "
                     rf"this model \(got 8x{f + 1}\)"):
    sampling.sample_latents(image, None, [""], "", dataclasses.replace(options(1.0),
                                                                      width=f + 1),
                            class_labels=[0])
  # An image model asked for frames: named (it failed inside the UNet).
  with pytest.raises(ValueError, match="num_frames=2 needs a video model"):
    sampling.sample_latents(image, None, [""], "", dataclasses.replace(options(1.0),
                                                                      num_frames=2),
                            class_labels=[0])
  # The seed draws x_T from fold_in(key(seed), 0) (the steps' noise from fold_in(.., 1)):
  # seed 3 equals its x_T given by hand (DDIM, eta 0: the steps draw nothing), seed 0
  # differs.
  # (Two labels, as `run` below samples: one compiled UNet and noise draw for both.)
  seeded = lambda seed, **kw: np.asarray(sampling.sample_latents(
      image, None, ["", ""], "", dataclasses.replace(options(1.0), seed=seed),
      class_labels=[0, 1], **kw))
  x_T = jax.random.normal(jax.random.fold_in(jax.random.key(3), 0),
                          (2, 8 // f, 8 // f, image.vae_config.latent_channels))
  np.testing.assert_array_equal(seeded(3), seeded(0, x_T=x_T))
  assert np.abs(seeded(3) - seeded(0)).max() > 1e-3
  unguided = run(image, 5.0, [0, 1])  # no null class: guidance_scale does nothing
  np.testing.assert_array_equal(run(with_null(2), 1.0, [0, 1]), unguided)
  guided = run(with_null(2), 5.0, [0, 1])
  assert np.abs(guided - unguided).max() > 1e-3
  # A "null class" equal to the label: both branches agree, guided = unguided (to
  # rounding), so the unconditional branch is the one that took the null label.
  np.testing.assert_allclose(run(with_null(1), 5.0, [1, 1]), run(image, 1.0, [1, 1]),
                             atol=1e-5)

  # The context samplers: out = f(null) + s (f(label) - f(null)), all in one UNet call.
  temporal = TemporalConfig(context_frames=True)
  ldm = VideoLDM.from_pretrained(image, temporal)
  # phi off its init (zero-initialised context projections would make the context
  # branch a no-op, and the context_scale check below vacuous).
  rng = np.random.default_rng(1)
  phi = jax.tree_util.tree_map(
      lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype),
      ldm.init_unet_params(1, where=partition.is_temporal))
  video = dataclasses.replace(image, temporal_config=temporal, training={"null_class_label": 2},
                              params={**image.params, "unet": merge(image.params["unet"], phi)})
  cm = context_sampling.ContextModel.from_pretrained(video)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 4, 4)), jnp.float32)
  cond = context_sampling.masked_cond(x, jnp.asarray([[1, 0, 0], [1, 1, 0]], jnp.float32))
  t = jnp.asarray([500, 200])
  labels, null = jnp.asarray([0, 1]), jnp.asarray([2, 2])
  f = lambda lab, c: np.asarray(cm.apply_fn({"params": cm.params}, x, t, None, lab, None,
                                            cond=c), np.float64)
  assert np.abs(f(labels, cond) - f(labels, 0 * cond)).max() > 1e-3  # the context acts
  for s_c in (1.0, 2.0):
    opts = context_sampling.ContextSampleOptions(guidance_scale=3.0, context_scale=s_c)
    out = context_sampling.guided_context_fn(cm, cond, opts, labels=labels,
                                             uncond_labels=null)(x, t)
    g = lambda c: f(null, c) + 3.0 * (f(labels, c) - f(null, c))
    want = g(cond) if s_c == 1.0 else g(0 * cond) + s_c * (g(cond) - g(0 * cond))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)

  # videoldm-generate conditions each stage's model on its own null class.
  got = generate._conditioning((video, None), generate.GenerateOptions(class_label=1))
  assert got["labels"].tolist() == [1] and got["uncond_labels"].tolist() == [2]
  assert "uncond_labels" not in generate._conditioning(
      (dataclasses.replace(video, training={}), None), generate.GenerateOptions(class_label=1))


def test_which_unets_are_called_with_a_context():
  # From a text encoder (text + classes: upscaler-style); without one, from outside
  # unless the model is class-conditional (its labels alone condition it).
  from videoldm_jax.models.unet import UNetConfig, called_with_context
  plain, classes = UNetConfig(), UNetConfig(num_class_embeds=4)
  assert [called_with_context(c, text) for c, text in (
      (plain, True), (classes, True), (plain, False), (classes, False))] == [
          True, True, True, False]


def test_the_tiny_image_config_has_a_class_conditional_variant():
  # videoldm-init-random --config=configs/image_tiny.py:classes=3 (README): a text-free
  # class-conditional model, the start of a class-guided chain from the command line.
  from videoldm_jax.config_files import load_sibling
  from tests.test_context_stages import ROOT
  module = load_sibling(str(ROOT / "configs" / "x.py"), "image_tiny")
  config = module.get_config("classes=3")
  assert "text_encoder" not in config and config.unet.num_class_embeds == 3
  plain = module.get_config()
  assert "text_encoder" in plain and "num_class_embeds" not in plain.unet
  for bad in ("classes=1", "classes=x", "labels=3"):
    with pytest.raises(ValueError, match="expected 'classes=N', N >= 2"):
      module.get_config(bad)


def test_the_chain_guides_a_class_conditional_video_against_its_null_class(tmp_path):
  # videoldm-generate end to end (key frames, a prediction round, decoding) with a
  # text-free class-conditional key-frame and prediction model: guidance_scale changes
  # the video only where the models record a null class.
  from tests.test_generate import tiny_image_config, video_model
  config = tiny_image_config()
  del config.text_encoder
  config.unet.num_class_embeds = 3
  image = pretrained.random_image_ldm(config)
  ctx = TemporalConfig(context_frames=True)

  def chain(tag: str, keyframe_null: bool, predictor_null: bool) -> dict:
    folders = {}
    for name, temporal, seed, null in (("keyframe", TemporalConfig(), 1, keyframe_null),
                                       ("predictor", ctx, 2, predictor_null)):
      record = {"stage": name, **({"null_class_label": 2} if null else {})}
      model = dataclasses.replace(video_model(image, temporal, seed), training=record)
      folders[f"{name}_model"] = str(pretrained.save(tmp_path / f"{name}_{tag}", model))
    return folders

  def video(tag: str, scale: float) -> tuple[np.ndarray, tuple]:
    out = tmp_path / f"{tag}_{scale}.npy"
    options = generate.GenerateOptions(
        class_label=1, num_frames=6, keyframes_per_clip=4, num_context=2, interp_passes=0,
        height=8, width=8, steps=2, guidance_scale=scale, fps=8.0, gif=False,
        progress=False)
    result = generate.generate_video(out, options, log=None, **chains[tag])
    # Frames 0-3: the key-frame model's clip; 4-5: one prediction round (decoded frame
    # by frame: each frame is its stage's alone).
    assert result.plan.rounds == 1
    return np.load(out).astype(int), result.notes

  chains = {tag: chain(tag, k, p) for tag, k, p in (
      ("both", True, True), ("keyframe", True, False), ("predictor", False, True),
      ("neither", False, False))}
  (one, _), (three, notes) = video("both", 1.0), video("both", 3.0)
  assert one.shape == (6, 8, 8, 3) and np.abs(three - one).max() > 0
  assert not any("guidance" in n for n in notes), notes
  # Each stage guides its own frames: the key-frame model's clip ...
  (one, _), (three, notes) = video("keyframe", 1.0), video("keyframe", 3.0)
  assert np.abs(three[:4] - one[:4]).max() > 0
  assert any("the predictor model samples unguided" in n for n in notes), notes
  # ... and the predictor's round (the key frames before it unchanged).
  (one, _), (three, notes) = video("predictor", 1.0), video("predictor", 3.0)
  np.testing.assert_array_equal(three[:4], one[:4])
  assert np.abs(three[4:] - one[4:]).max() > 0
  assert any("the keyframe model samples unguided" in n for n in notes), notes
  (one, _), (three, notes) = video("neither", 1.0), video("neither", 3.0)
  np.testing.assert_array_equal(three, one)
  assert any("guidance_scale=3.0 ignored" in n for n in notes), notes
