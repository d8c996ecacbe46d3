"""The generic train step on the key-frame stage: frozen theta, sharding, NaN skipping."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from videoldm_jax import pretrained, sharding
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.tokenizer import CLIPTokenizer, write_byte_level_tokenizer
from videoldm_jax.stages import keyframe
from videoldm_jax.train import flops as flops_lib
from videoldm_jax.train import optim
from videoldm_jax.train import step as step_lib
from videoldm_jax.train.state import tree_bytes
from videoldm_jax.video_ldm import VideoLDM

# One UNet level, with attention: the tests read the step's sharding, frozen and trained
# parts and FLOPs, which a second level (its down- and upsampler, XLA's own stride-2
# convolutions) does not change; every layer kind with a C++ kernel or a sharding rule
# (ResBlocks, attention, the temporal layers) is at the one level. Two levels (16, 32)
# compiled the 8-device step in 55 s of CPU, one in 38 s (the file's costliest program).
TINY = ml_collections.ConfigDict(dict(
    seed=0,
    unet=dict(block_out_channels=(32,), layers_per_block=1, attention_levels=(True,),
              num_heads=2, cross_attention_dim=16, norm_num_groups=8),
    vae=dict(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8),
    text_encoder=dict(vocab_size=514, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=16),
    scheduler=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   prediction_type="epsilon")))
OPTIM = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=2, total_steps=20,
                                       weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                                       grad_clip=1.0))


@functools.lru_cache(maxsize=None)
def _image_model():
  return pretrained.random_image_ldm(TINY)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tok")
  write_byte_level_tokenizer(str(folder))
  return CLIPTokenizer.from_folder(str(folder))


def _setup(mode, mesh_shape, tokenizer):
  """(state, jitted step, batch sharding); jax.jit compiles on the first call."""
  image = _image_model()
  ldm = VideoLDM.from_pretrained(image, TemporalConfig())
  phi = ldm.init_unet_params(seed=1, where=lambda p: any(s.startswith("temporal_") for s in p))
  params = {**image.params, "unet": traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(image.params["unet"]), **traverse_util.flatten_dict(phi)})}
  stage = keyframe.make_stage(ldm, keyframe.KeyframeOptions(mode=mode),
                              tokenizer([""], max_length=16)[0])
  tx = optim.make_optimizer(OPTIM)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
  abstract = ldm.abstract_params()
  param_sh = sharding.shardings_for(ldm.logical_axes(), mesh, abstract)
  shardings = step_lib.state_shardings(param_sh, stage, tx, abstract, mesh)
  state = step_lib.init_state(params, stage, tx, shardings)
  batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  fn = step_lib.build_train_step(stage, tx, seed=0, ema_decay=0.99, shardings=shardings,
                                 batch_sharding=batch_sh)
  return state, fn, batch_sh


def _batch(tokenizer, seed=0, batch=4):
  rng = np.random.default_rng(seed)
  return {"video": rng.integers(0, 256, (batch, 4, 16, 16, 3), dtype=np.uint8),
          "tokens": tokenizer(["a car", "a road at night", "rain", "two trucks"][:batch],
                              max_length=16)}


def _run(state, fn, batch_sh, tokenizer, steps):
  losses = []
  for i in range(steps):
    batch = jax.device_put(_batch(tokenizer, seed=i), batch_sh)
    state, metrics = fn(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def temporal_1dev(tokenizer):
  """(fresh_state(), compiled step, batch sharding) of the temporal stage on 1 device."""
  _, fn, batch_sh = _setup("temporal", {"data": 1}, tokenizer)
  return (lambda: _setup("temporal", {"data": 1}, tokenizer)[0]), fn, batch_sh


def test_theta_frozen_phi_trained_and_optimizer_holds_only_phi(temporal_1dev, tokenizer):
  fresh, fn, batch_sh = temporal_1dev
  state = fresh()
  theta0 = jax.tree_util.tree_map(np.asarray, state.frozen)
  phi0 = jax.tree_util.tree_map(np.asarray, state.trainable)
  phi_bytes = tree_bytes(phi0)
  # AdamW keeps mu and nu per trainable leaf, plus two int32 step counters.
  assert tree_bytes(state.opt_state) == 2 * phi_bytes + 2 * 4
  assert set(state.frozen) == {"unet", "vae", "text_encoder"}
  assert all(any(k.startswith("temporal_") for k in p)
             for p in traverse_util.flatten_dict(phi0))
  state, losses = _run(state, fn, batch_sh, tokenizer, 3)
  assert all(np.isfinite(losses))
  for a, b in zip(jax.tree_util.tree_leaves(state.frozen), jax.tree_util.tree_leaves(theta0)):
    np.testing.assert_array_equal(np.asarray(a), b)
  changed = [not np.array_equal(np.asarray(a), b) for a, b in
             zip(jax.tree_util.tree_leaves(state.trainable), jax.tree_util.tree_leaves(phi0))]
  assert all(changed)
  assert int(state.step) == 3 and int(state.skipped) == 0


def test_modes_train_the_unet_never_the_autoencoder_or_text_encoder():
  # 'full' fine-tunes the whole UNet (theta and phi), 'temporal' phi alone; neither
  # touches the VAE or the text encoder, whose outputs the UNet was trained on.
  full, temporal = keyframe.is_trainable_fn("full"), keyframe.is_trainable_fn("temporal")
  theta = ("unet", "down_blocks_0", "resnets_0", "conv1", "kernel")
  phi = ("unet", "down_blocks_0", "temporal_resnets_0", "conv1", "kernel")
  others = [("vae", "encoder", "conv_in", "kernel"), ("text_encoder", "final_layer_norm",
                                                      "scale")]
  assert [full(p) for p in [theta, phi, *others]] == [True, True, False, False]
  assert [temporal(p) for p in [theta, phi, *others]] == [False, True, False, False]
  with pytest.raises(ValueError, match="mode must be 'temporal' or 'full', got 'lora'"):
    keyframe.is_trainable_fn("lora")


def test_temporal_training_costs_fewer_flops_than_full(temporal_1dev, tokenizer):
  # Gradients are taken w.r.t. phi only, so theta's weight gradients are not even in the
  # traced program: the model FLOP count of the step's jaxpr shows it (train/flops.py,
  # which counts the C++ weight gradients' custom calls; XLA's cost analysis sees no
  # FLOPs in custom calls).
  # The temporal step is the module's (already traced by the tests before: its trace is
  # reused); the full one is built here.
  fresh, fn, batch_sh = temporal_1dev
  steps = {"temporal": (fresh(), fn, batch_sh), "full": _setup("full", {"data": 1}, tokenizer)}
  flops = {}
  for mode, (state, fn, batch_sh) in steps.items():
    batch = jax.device_put(_batch(tokenizer), batch_sh)
    flops[mode] = flops_lib.model_flops(fn, state, batch)
  assert flops["temporal"] < 0.9 * flops["full"], flops


def test_non_finite_step_is_skipped_and_counted(temporal_1dev, tokenizer):
  fresh, fn, batch_sh = temporal_1dev
  state = fresh()
  # A NaN in one temporal weight makes the loss and every gradient NaN.
  flat = traverse_util.flatten_dict(state.trainable)
  path = sorted(p for p in flat if p[-1] == "mix_factor")[0]
  flat[path] = jnp.full_like(flat[path], jnp.nan)
  state = state.replace(trainable=traverse_util.unflatten_dict(flat))
  before = jax.tree_util.tree_map(np.asarray, (state.trainable, state.opt_state, state.ema))
  state, metrics = fn(state, jax.device_put(_batch(tokenizer), batch_sh))
  assert not bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.step) == 1
  after = jax.tree_util.tree_map(np.asarray, (state.trainable, state.opt_state, state.ema))
  for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_one_device_and_eight_device_mesh_agree(temporal_1dev, tokenizer):
  fresh, f1, b1 = temporal_1dev
  s1 = fresh()
  s8, f8, b8 = _setup("temporal", {"data": 2, "fsdp": 2, "tensor": 2}, tokenizer)
  # The EMA and Adam's moments of each parameter live where it lives (split, not
  # replicated copies that would undo FSDP's saving).
  params = jax.tree_util.tree_leaves(s8.trainable)
  assert sum(not p.sharding.is_fully_replicated for p in params) > 10
  for name in ("mu", "nu"):
    (_, moments), = optax.tree_utils.tree_get_all_with_path(s8.opt_state, name)
    copies = [("ema", s8.ema), (name, moments)]
    for what, tree in copies:
      assert jax.tree.structure(tree) == jax.tree.structure(s8.trainable), what
      assert [x.sharding for x in jax.tree_util.tree_leaves(tree)] == \
          [p.sharding for p in params], what
  # The programs measured are the ones that run (a call of the jitted step after
  # .compile() compiled it again).
  c1 = f1.lower(s1, jax.device_put(_batch(tokenizer), b1)).compile()
  c8 = f8.lower(s8, jax.device_put(_batch(tokenizer), b8)).compile()
  mem1, mem8 = c1.memory_analysis(), c8.memory_analysis()
  # Parameters and optimiser state are split over fsdp x tensor: per-device arguments
  # shrink well below the single-device size.
  assert mem8.argument_size_in_bytes < 0.6 * mem1.argument_size_in_bytes
  _, l1 = _run(s1, c1, b1, tokenizer, 5)
  _, l8 = _run(s8, c8, b8, tokenizer, 5)
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)


def _one_device_step(params, stage, tx):
  """(train state of `params`, replicated on one device; the stage's jitted step)."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rep = NamedSharding(mesh, PartitionSpec())
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  shardings = step_lib.state_shardings(jax.tree_util.tree_map(lambda _: rep, params), stage,
                                       tx, abstract, mesh)
  return (step_lib.init_state(params, stage, tx, shardings),
          step_lib.build_train_step(stage, tx, seed=0))


def test_grouped_optimisers_step_each_group_with_its_own_settings():
  """Two networks, one loss (the sum of their terms), one step: each group gets its own
  optimiser (here lr 0 for 'disc'), its own clipping and its own logged gradient norm."""
  params = {"gen": {"w": np.full((3,), 2.0, np.float32)},
            "disc": {"w": np.full((2,), 1.0, np.float32)}}
  # d/dw of sum(w^2) = 2w: |grad gen| = sqrt(3 * 4^2), |grad disc| = sqrt(2 * 2^2).
  loss_fn = lambda p, batch, key, step: (jnp.sum(p["gen"]["w"] ** 2)
                                         + jnp.sum(p["disc"]["w"] ** 2), {})
  group = lambda path: "discriminator" if path[0] == "disc" else "generator"
  stage = step_lib.Stage("gan", lambda path: True, loss_fn, group=group)
  frozen_lr = OPTIM.copy_and_resolve_references()
  frozen_lr.lr = 0.0
  tx = optim.make_grouped_optimizer({"generator": OPTIM, "discriminator": frozen_lr}, group)
  state, train_step = _one_device_step(params, stage, tx)
  state, metrics = train_step(state, {"x": jnp.zeros((1,))})
  # Each group clipped to grad_clip = 1 on its own: after one step each group's Adam
  # first moment is (1 - b1) x its clipped gradient, of norm 0.1 (clipped jointly the
  # two would share the norm: 0.04 and 0.09; unclipped 0.28 and 0.69).
  moments = [m for _, m in optax.tree_utils.tree_get_all_with_path(state.opt_state, "mu")]
  norms = sorted(float(optax.tree.norm(m)) for m in moments)  # (masked leaves: empty)
  np.testing.assert_allclose(norms, [0.1, 0.1], rtol=1e-5)
  state, metrics = train_step(state, {"x": jnp.zeros((1,))})
  np.testing.assert_array_equal(np.asarray(state.trainable["disc"]["w"]), params["disc"]["w"])
  assert np.all(np.asarray(state.trainable["gen"]["w"]) < 2.0)
  np.testing.assert_allclose(float(metrics["grad_norm/discriminator"]), np.sqrt(2 * 4.0),
                             rtol=1e-6)
  assert 0 < float(metrics["grad_norm/generator"]) < np.sqrt(3 * 16.0)  # gen has moved


def test_a_discriminator_is_held_at_its_initialisation_before_disc_start():
  """The autoencoder stages' discriminator gets a zero gradient before loss.disc_start;
  AdamW's decoupled weight decay shrank its weights anyway (by (1 - lr wd) a step), so
  it started from decayed weights. Now its update is zero until disc_start, counted on
  the train state's step (as the loss's disc_factor), then it trains with decay."""
  from pathlib import Path
  from videoldm_jax.config_files import load_sibling
  from videoldm_jax.stages import autoencoder
  from videoldm_jax.train import gan
  config = load_sibling(str(Path(__file__).parents[1] / "configs" / "x.py"),
                        "autoencoder_tiny").get_config()
  config.loss.disc_start = 3
  config.disc_optim.update(weight_decay=0.5, lr=0.1)
  params = {"vae": {"w": np.full((3,), 2.0, np.float32)},
            "discriminator": {"w": np.full((2,), 1.0, np.float32)}}

  def loss_fn(p, batch, key, step):  # the stage's shape: disc term times disc_factor
    factor = gan.disc_factor(step, config.loss.disc_start)
    return jnp.sum(p["vae"]["w"] ** 2) + factor * jnp.sum(p["discriminator"]["w"]), {}
  stage = step_lib.Stage("gan", lambda path: True, loss_fn, group=autoencoder.group)
  tx = autoencoder.optimizer(config)
  state, train_step = _one_device_step(params, stage, tx)
  for _ in range(3):
    state, metrics = train_step(state, {"x": jnp.zeros((1,))})
    assert float(metrics["grad_norm/discriminator"]) == 0.0
  np.testing.assert_array_equal(np.asarray(state.trainable["discriminator"]["w"]),
                                params["discriminator"]["w"])  # was 0.95^3 = 0.857
  assert np.all(np.asarray(state.trainable["vae"]["w"]) < 2.0)  # the generator trained
  state, _ = train_step(state, {"x": jnp.zeros((1,))})  # step 3 = disc_start: it trains
  # Adam's step (-lr * ~1 against a gradient of +1 per weight) plus the decay.
  assert np.all(np.asarray(state.trainable["discriminator"]["w"]) < 0.95)
