"""Checkpoints that leave the frozen parameters out (train/frozen.py): what is on disk,
the bitwise resume, and the refusal to resume onto other frozen weights."""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from videoldm_jax.config_files import load_sibling
from videoldm_jax.models import params as params_lib
from videoldm_jax.sharding import make_mesh
from videoldm_jax.train import frozen as frozen_lib
from videoldm_jax.train import step as step_lib
from videoldm_jax.train.checkpointing import Checkpointer
from videoldm_jax.train.loop import stage_setup
from videoldm_jax.train.state import split

ROOT = Path(__file__).resolve().parents[1]


def _is_trainable(path):
  return path[0] == "unet" and path[1].startswith("temporal")


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return {"unet": {"conv": {"kernel": f(8, 4)}, "temporal_mix": {"kernel": f(4, 4)}},
          "vae": {"w": f(16)}}


def _setup():
  mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  rep = NamedSharding(mesh, P())
  fsdp = NamedSharding(mesh, P("fsdp"))
  param_sh = {"unet": {"conv": {"kernel": fsdp}, "temporal_mix": {"kernel": rep}},
              "vae": {"w": fsdp}}
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    _params())
  loss = lambda p, batch, key, step: (jnp.sum(p["unet"]["temporal_mix"]["kernel"] ** 2), {})
  stage = step_lib.Stage("test", _is_trainable, loss)
  tx = optax.adam(1e-2)
  shardings = step_lib.state_shardings(param_sh, stage, tx, abstract, mesh)
  target = step_lib.abstract_state(step_lib.abstract_train_state(abstract, stage, tx),
                                   shardings)
  state = step_lib.init_state(_params(), stage, tx, shardings)
  step = step_lib.build_train_step(stage, tx, seed=0, shardings=shardings,
                                   batch_sharding=rep)
  state, _ = step(state, {"x": jnp.zeros((2,))})
  return stage, state, target


def _save(directory, state, save_frozen):
  digests = frozen_lib.leaf_digests(split(_params(), _is_trainable)[1])
  with Checkpointer(directory) as ck:
    ck.save(1, frozen_lib.checkpoint_tree(state, save_frozen), frozen_digests=digests,
            force=True)


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert x.sharding == y.sharding


def _no_init(need=None):
  raise AssertionError("init_params called although the checkpoint holds theta")


def test_default_checkpoint_leaves_frozen_out_and_resumes_bitwise(tmp_path):
  stage, state, target = _setup()
  _save(tmp_path, state, save_frozen=False)
  ck = Checkpointer(tmp_path)
  assert ck.state_fields(1) == ["ema", "opt_state", "skipped", "step", "trainable"]
  digests = ck.frozen_digests(1)
  assert sorted(digests) == ["unet/conv/kernel", "vae/w"]
  # '<shape> <dtype> <sha256>', the hash of exactly the leaf's bytes.
  w = _params()["vae"]["w"]
  assert digests["vae/w"] == f"(16,) float32 {hashlib.sha256(w.tobytes()).hexdigest()}"
  calls = []

  def init(need):
    # As a stage does: the leaves `need` rejects (the trainable ones) are left out.
    calls.append(need)
    flat = traverse_util.flatten_dict(_params())
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if need(k)})

  restored, data_state, got = frozen_lib.restore(ck, 1, target, init, stage.is_trainable)
  assert len(calls) == 1 and data_state is None and got == digests
  assert not calls[0](("unet", "temporal_mix", "kernel")) and calls[0](("vae", "w"))
  _assert_bitwise(restored, state)


def test_resume_onto_other_frozen_weights_names_the_leaf(tmp_path):
  stage, state, target = _setup()
  _save(tmp_path, state, save_frozen=False)
  other = _params()
  other["vae"]["w"][3] += 1e-6  # one element of one frozen leaf
  with pytest.raises(ValueError) as e:
    frozen_lib.restore(Checkpointer(tmp_path), 1, target, lambda need: other,
                       stage.is_trainable)
  msg = str(e.value)
  assert "1 of 2 leaves differ" in msg and "'vae/w': trained with (16,) float32" in msg, msg
  assert "unet/conv/kernel" not in msg and str(tmp_path) in msg
  # Another split into trainable and frozen leaves (e.g. mode=full) is named as such.
  split_other = lambda p: p[0] == "unet"
  with pytest.raises(ValueError, match=r"trained with but not loaded: \['unet/conv/kernel'\]"
                                       r".*another split into trainable and frozen"):
    frozen_lib.restore(Checkpointer(tmp_path), 1, target, lambda need: _params(),
                       split_other)
  # A changed shape is named with both shapes.
  other = _params()
  other["unet"]["conv"]["kernel"] = np.zeros((8, 5), np.float32)
  with pytest.raises(ValueError, match=r"'unet/conv/kernel': trained with \(8, 4\) "
                                       r"float32 [0-9a-f]{12}…, loaded \(8, 5\) float32"):
    frozen_lib.restore(Checkpointer(tmp_path), 1, target, lambda need: other,
                       stage.is_trainable)


def test_save_frozen_checkpoint_restores_without_init_params(tmp_path):
  stage, state, target = _setup()
  _save(tmp_path, state, save_frozen=True)
  ck = Checkpointer(tmp_path)
  assert "frozen" in ck.state_fields(1)
  restored, _, digests = frozen_lib.restore(ck, 1, target, _no_init, stage.is_trainable)
  _assert_bitwise(restored, state)
  assert digests == ck.frozen_digests(1)


@pytest.mark.parametrize("save_frozen", [False, True])
def test_restore_reads_the_step_asked_for_not_the_latest(tmp_path, save_frozen):
  # videoldm-export --step=N and --step=best restore an older step through this path.
  stage, state, target = _setup()
  digests = frozen_lib.leaf_digests(split(_params(), _is_trainable)[1])
  with Checkpointer(tmp_path) as ck:
    for n, s in ((1, state), (2, state.replace(step=state.step + 5))):
      ck.save(n, frozen_lib.checkpoint_tree(s, save_frozen), frozen_digests=digests,
              force=True)
  restored, _, _ = frozen_lib.restore(Checkpointer(tmp_path), 1, target,
                                      lambda need: _params(), stage.is_trainable)
  assert int(restored.step) == int(state.step)


def test_leaf_digest_names_the_dtype_of_half_precision_leaves():
  # Frozen bf16 / fp16 weights: a dtype change must show in the digest.
  assert frozen_lib.leaf_digest(np.ones(2, np.float16)).startswith("(2,) float16 ")
  assert frozen_lib.leaf_digest(jnp.ones(2, jnp.bfloat16)).startswith("(2,) bfloat16 ")
  assert frozen_lib.leaf_digest(jnp.ones(2, jnp.bfloat16)) != frozen_lib.leaf_digest(
      jnp.ones(2, jnp.float16))


def test_leaf_digest_tells_a_0d_leaf_from_a_one_element_vector():
  # np.ascontiguousarray made every 0-d leaf (1,): the two had one digest.
  scalar = frozen_lib.leaf_digest(np.float32(2))
  vector = frozen_lib.leaf_digest(np.full(1, 2, np.float32))
  assert scalar.startswith("() float32 ") and vector.startswith("(1,) float32 ")
  assert scalar.split()[-1] == vector.split()[-1]  # the same bytes


def test_checkpoint_of_frozen_but_no_digests_gets_them_from_the_restored_state(tmp_path):
  # What videoldm-train wrote before digests existed: the whole TrainState, no digests.
  stage, state, target = _setup()
  with Checkpointer(tmp_path) as ck:
    ck.save(1, state, force=True)
  ck = Checkpointer(tmp_path)
  assert ck.frozen_digests(1) is None
  restored, _, digests = frozen_lib.restore(ck, 1, target, _no_init, stage.is_trainable)
  _assert_bitwise(restored, state)
  assert digests == frozen_lib.leaf_digests(split(_params(), _is_trainable)[1])


def test_checkpoint_with_neither_frozen_nor_digests_is_refused(tmp_path):
  stage, state, target = _setup()
  with Checkpointer(tmp_path) as ck:
    ck.save(1, frozen_lib.checkpoint_tree(state, False), force=True)
  with pytest.raises(ValueError, match="neither the frozen parameters nor their digests"):
    frozen_lib.restore(Checkpointer(tmp_path), 1, target, _no_init, stage.is_trainable)
  # Written by videoldm-train (its config beside it), frozen_digests/ since lost: a
  # damaged step, with the usual remedy (it read "not written by videoldm-train?").
  with Checkpointer(tmp_path / "lost") as ck:
    ck.save(1, frozen_lib.checkpoint_tree(state, False), frozen_digests={"w": "x"},
            config={"stage": "toy"}, force=True)
  import shutil
  shutil.rmtree(tmp_path / "lost" / "1" / "frozen_digests")
  with pytest.raises(ValueError, match=r"(?s)holds neither the frozen parameters nor "
                     r"frozen_digests/\. It looks complete but cannot be read.*start from "
                     "scratch"):
    frozen_lib.restore(Checkpointer(tmp_path / "lost"), 1, target, _no_init,
                       stage.is_trainable)


@pytest.mark.parametrize("layout", ["default", "save_frozen", "before_digests"])
def test_stage_without_frozen_parameters_resumes_in_every_layout(layout, tmp_path):
  # The autoencoder stage without its perceptual term trains every leaf: frozen is {}.
  mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  rep = NamedSharding(mesh, P())
  params = {"vae": {"w": np.arange(4, dtype=np.float32)}}
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  stage = step_lib.Stage("all", lambda p: True, lambda p, b, k, s: (jnp.sum(p["vae"]["w"]), {}))
  tx = optax.adam(1e-2)
  shardings = step_lib.state_shardings({"vae": {"w": rep}}, stage, tx, abstract, mesh)
  target = step_lib.abstract_state(step_lib.abstract_train_state(abstract, stage, tx),
                                   shardings)
  state = step_lib.init_state(params, stage, tx, shardings)
  assert state.frozen == {}
  tree = frozen_lib.checkpoint_tree(state, layout != "default")
  with Checkpointer(tmp_path) as ck:
    ck.save(1, tree, frozen_digests=None if layout == "before_digests" else {}, force=True)
  ck = Checkpointer(tmp_path)
  assert ("frozen" in ck.state_fields(1)) == (layout != "default")
  restored, _, digests = frozen_lib.restore(ck, 1, target, _no_init, stage.is_trainable)
  _assert_bitwise(restored, state)
  assert digests == {}
  if layout == "default":
    # Resumed with a frozen leaf the run had none of (the perceptual term switched on
    # since): named, not a pytree structure error.
    more = {**params, "lpips": {"k": np.ones(2, np.float32)}}
    frozen_too = step_lib.Stage("more", lambda p: p[0] == "vae", stage.loss_fn)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), more)
    shardings = step_lib.state_shardings({"vae": {"w": rep}, "lpips": {"k": rep}},
                                         frozen_too, tx, abstract, mesh)
    target = step_lib.abstract_state(step_lib.abstract_train_state(abstract, frozen_too, tx),
                                     shardings)
    with pytest.raises(ValueError, match=r"loaded but not trained with: \['lpips/k'\]"):
      frozen_lib.restore(ck, 1, target, lambda need: more, frozen_too.is_trainable)


@pytest.mark.parametrize("name", ["keyframe_tiny", "decoder_tiny", "upsampler_tiny",
                                  "autoencoder_tiny"])
def test_stage_init_for_a_resume_initialises_no_trainable_leaf(name, tmp_path, monkeypatch):
  # What a resume asks for (frozen.restore): init_params(need) with need = frozen. The
  # stage must return every frozen leaf, as the full init has it, and must not spend
  # the host init on trainable leaves (the checkpoint replaces them).
  config = load_sibling(str(ROOT / "configs" / "x.py"), name).get_config()
  full = traverse_util.flatten_dict(stage_setup(config, tmp_path / "a").init_params())
  setup = stage_setup(config, tmp_path / "b")
  trainable = setup.stage.is_trainable
  made = []  # the arrays the host initialiser produced during the call
  real = params_lib.init_params

  def spy(*args, **kwargs):
    out = real(*args, **kwargs)
    made.extend(id(v) for v in jax.tree_util.tree_leaves(out))
    return out

  monkeypatch.setattr(params_lib, "init_params", spy)
  got = traverse_util.flatten_dict(setup.init_params(lambda p: not trainable(p)))
  frozen = {k for k in full if not trainable(k)}
  assert frozen <= got.keys(), sorted(frozen - got.keys())[:4]
  for k in frozen:
    np.testing.assert_array_equal(got[k], full[k], err_msg="/".join(k))
  initialised_trainable = [k for k, v in got.items() if trainable(k) and id(v) in made]
  assert not initialised_trainable, initialised_trainable[:4]
  assert any(trainable(k) for k in full)  # the check above had something to leave out
