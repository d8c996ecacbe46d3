"""Every parameter of every model (image and video UNet, image and video VAE, CLIP,
discriminators) carries logical axis names that the default rules know, and sharding
by them over a mesh of 8 fake CPU devices leaves the computation unchanged."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from videoldm_jax import sharding
from videoldm_jax.models import discriminator as disc_lib
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from videoldm_jax.models.temporal import TemporalConfig

UNET = unet_lib.UNetConfig(block_out_channels=(16, 32), layers_per_block=1,
                           attention_levels=(True, True), num_heads=2, cross_attention_dim=8,
                           norm_num_groups=8, num_class_embeds=3, use_linear_projection=True)
VAE = vae_lib.VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8)
TEXT = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8)

DISC = disc_lib.DiscriminatorConfig()
_x, _t, _ctx, _labels = unet_lib.example_inputs(UNET)
MODELS = {
    "unet": (unet_lib.UNet(UNET), unet_lib.example_inputs(UNET)),
    "video_unet": (unet_lib.UNet(UNET, TemporalConfig(conv_kernel=(3, 3, 3),
                                                      cross_attention=True)),
                   (jnp.zeros((1, 2) + _x.shape[1:]), _t, _ctx, _labels)),
    "vae": (vae_lib.AutoencoderKL(VAE), vae_lib.example_inputs(VAE)),
    "video_vae": (vae_lib.AutoencoderKL(VAE, vae_lib.VAETemporalConfig()),
                  vae_lib.example_inputs(VAE, video=True)),
    "clip": (CLIPTextModel(TEXT), (jnp.zeros((1, 8), jnp.int32),)),
    "discriminator": (disc_lib.PatchDiscriminator(DISC),
                      disc_lib.example_inputs(DISC, video=False)),
    "video_discriminator": (disc_lib.VideoPatchDiscriminator(DISC),
                            disc_lib.example_inputs(DISC, video=True)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_param_has_known_logical_axes(name):
  module, inputs = MODELS[name]
  specs = params_lib.logical_axes(module, *inputs)
  shapes = params_lib.abstract_params(module, *inputs)
  flat_specs = jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree_util.tree_leaves(shapes)
  assert len(flat_specs) == len(flat_shapes) > 0
  for (path, spec), shape in zip(flat_specs, flat_shapes):
    assert len(spec) == len(shape.shape), (path, spec, shape.shape)
    assert all(a in sharding.KNOWN_LOGICAL_AXES for a in spec), (path, spec)


def test_weights_name_their_dimensions_in_order():
  # Which dimension an axis names decides what a mesh splits (an input width split as
  # if it were the output's costs memory and collectives, not values: no other test
  # sees it). Kernels are (in, out); convolutions (kh, kw, in, out).
  module, inputs = MODELS["unet"]
  specs = traverse_util.flatten_dict(
      params_lib.logical_axes(module, *inputs),
      is_leaf=lambda _, x: isinstance(x, jax.sharding.PartitionSpec), sep="/")
  block = "down_blocks_0/attentions_0/transformer_blocks_0"
  want = {"class_embedding/embedding": ("vocab", "embed"),
          "conv_in/kernel": ("conv_kh", "conv_kw", "conv_in", "conv_out"),
          "time_embedding/linear_1/kernel": ("embed", "mlp"),
          "time_embedding/linear_2/kernel": ("mlp", "embed"),  # (square: names only)
          "down_blocks_0/resnets_0/time_emb_proj/kernel": ("embed", "conv_out"),
          f"{block}/attn1/to_q/kernel": ("embed", "heads"),
          f"{block}/attn1/to_out_0/kernel": ("heads", "embed"),
          f"{block}/ff/net_2/kernel": ("mlp", "embed")}
  assert {k: tuple(specs[k]) for k in want} == want


def test_config_rules_name_every_logical_axis():
  from configs import keyframe_base
  assert {name for name, _ in keyframe_base.DEFAULT_RULES} == sharding.KNOWN_LOGICAL_AXES
  # ... with the library's placement (a copy: configs import no JAX).
  assert tuple(keyframe_base.DEFAULT_RULES) == sharding.DEFAULT_RULES


def test_unet_sharded_by_rules_matches_single_device():
  module, (x, t, ctx, labels) = MODELS["unet"]
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  ctx = jax.random.normal(jax.random.key(2), (2, 3, 8))
  labels = jnp.array([0, 2])
  params = params_lib.init_params(module, 0, x, t, ctx, labels)
  ref = jax.jit(module.apply)({"params": params}, x, jnp.array([5, 900]), ctx, labels)
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  shardings = sharding.shardings_for(params_lib.logical_axes(module, x, t, ctx, labels), mesh,
                                     params)
  sharded = jax.device_put(params, shardings)
  kernel = sharded["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  # Attention heads and the MLP width over "tensor", the model width over "fsdp".
  block = sharded["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
  assert block["attn1"]["to_q"]["kernel"].sharding.spec == \
      jax.sharding.PartitionSpec("fsdp", "tensor")
  assert block["ff"]["net_2"]["kernel"].sharding.spec == \
      jax.sharding.PartitionSpec("tensor", "fsdp")
  # 3 label rows do not split 2 ways: replicated rather than an error.
  assert sharded["class_embedding"]["embedding"].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp")
  out = jax.jit(module.apply)({"params": sharded}, x, jnp.array([5, 900]), ctx, labels)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_mesh_errors_are_specific():
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="needs 6 devices, have 8"):
    sharding.make_mesh({"data": 3, "fsdp": 2})
  with pytest.raises(ValueError, match="unknown"):
    sharding.make_mesh({"model": 8})
  # A zero size divided by zero; two negative ones fell through to numpy's reshape.
  with pytest.raises(ValueError, match=r"mesh sizes must be >= 1 .*'fsdp': 0.*config.mesh"):
    sharding.make_mesh({"data": -1, "fsdp": 0})
  with pytest.raises(ValueError, match=r"'fsdp': -2"):
    sharding.make_mesh({"data": -1, "fsdp": -2})
  # int() made 2.5 a 2 (a 2 x 4 mesh) and "8" an 8; a dcn axis of size 1 went unread.
  for bad in (2.5, "8", True):
    with pytest.raises(ValueError, match=r"config.mesh: sizes must be whole numbers"):
      sharding.make_mesh({"data": bad, "fsdp": -1})
  with pytest.raises(ValueError, match=r"config.dcn_mesh axes \['slices'\] are unknown"):
    sharding.make_mesh({"data": -1}, dcn_shape={"slices": 1})
  with pytest.raises(ValueError, match=r"config.dcn_mesh sizes must be explicit"):
    sharding.make_mesh({"data": -1}, dcn_shape={"data": -1})
  # Whole sizes >= 1 there too: int() of their product made these one slice, silently.
  for dcn in ({"data": 1.5}, {"data": True}, {"data": 2, "fsdp": 0.5}, {"data": "2"}):
    with pytest.raises(ValueError, match=r"config.dcn_mesh: sizes must be whole numbers"):
      sharding.make_mesh({"fsdp": -1}, dcn_shape=dcn)
  with pytest.raises(ValueError, match=r"dcn mesh sizes must be >= 1, got \{'fsdp': 0\}"):
    sharding.make_mesh({"fsdp": -1}, dcn_shape={"data": 2, "fsdp": 0})


def test_multi_slice_mesh_puts_only_dcn_axes_across_granules():
  # On CPU the granules are processes: with one process every device is one granule,
  # so asking for 2 slices must fail clearly rather than build a wrong layout.
  with pytest.raises(ValueError, match=r"config.dcn_mesh \{.data.: 2\} needs 2 processes, "
                     r"the devices are in 1"):
    sharding.make_mesh({"fsdp": -1}, dcn_shape={"data": 2})
  mesh = sharding.make_mesh({"fsdp": -1}, dcn_shape={"data": 1})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_widths_a_mesh_axis_does_not_divide_are_replicated_with_a_warning(caplog):
  module, inputs = MODELS["unet"]
  specs = params_lib.logical_axes(module, *inputs)
  shapes = params_lib.abstract_params(module, *inputs)
  with caplog.at_level("WARNING"):
    sharding.shardings_for(specs, sharding.make_mesh({"fsdp": 2}, jax.devices()[:2]), shapes)
  assert "split less" not in caplog.text  # only the 3-row label table: under 1%
  with caplog.at_level("WARNING"):
    sh = sharding.shardings_for(specs, sharding.make_mesh({"fsdp": 3}, jax.devices()[:3]),
                                shapes)
  assert "split less than the rules say" in caplog.text
  assert "a dimension is not divisible by its mesh axes" in caplog.text
  kernel = sh["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]  # 16 channels, 3 ways
  assert kernel.spec == jax.sharding.PartitionSpec(None, None, None, None)


def test_a_rule_over_several_mesh_axes_splits_by_their_product():
  # ("embed", ("fsdp", "tensor")) on fsdp=2 x tensor=2 splits four ways: 8 rows split,
  # 6 rows are kept whole (4 does not divide 6; split by fsdp's 2 alone they passed the
  # check and JAX refused the placement, naming no config field).
  rules = [(name, ("fsdp", "tensor") if name == "embed" else axes)
           for name, axes in sharding.DEFAULT_RULES]
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
  P = jax.sharding.PartitionSpec
  specs = {"even": P("embed", None), "odd": P("embed", None)}
  shapes = {"even": jax.ShapeDtypeStruct((8, 3), jnp.float32),
            "odd": jax.ShapeDtypeStruct((6, 3), jnp.float32)}
  sh = sharding.shardings_for(specs, mesh, shapes, rules)
  assert sh["even"].spec == P(("fsdp", "tensor"), None)
  assert sh["odd"].spec == P(None, None)


def test_rules_and_batch_axes_are_checked():
  # A misspelt logical name left its weights whole on every device, silently; a mesh
  # axis the mesh lacks failed with a bare KeyError.
  rules = list(sharding.DEFAULT_RULES)
  with pytest.raises(ValueError, match=r"config.rules: logical axes \['conv_outs'\] are not "
                     "the models'"):
    sharding.check_rules([("conv_outs", "fsdp") if r[0] == "conv_out" else r for r in rules])
  with pytest.raises(ValueError, match=r"config.rules gives no placement for logical axes "
                     r"\['embed'\]"):
    sharding.check_rules([r for r in rules if r[0] != "embed"])
  with pytest.raises(ValueError, match=r"config.rules: mesh axes \['model'\] are not the "
                     "mesh's"):
    sharding.check_rules([("embed", "model") if r[0] == "embed" else r for r in rules])
  with pytest.raises(ValueError, match=r"config.rules names logical axes \['embed'\] more "
                     "than once"):
    sharding.check_rules(rules + [("embed", None)])  # flax would keep the first
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  with pytest.raises(ValueError, match=r"config.batch_axes=\('data', 'dcn'\): \['dcn'\]"):
    sharding.check_batch_split(4, 1, mesh, ("data", "dcn"))
  with pytest.raises(ValueError, match=r"config.train.grad_accum=0 must be >= 1"):
    sharding.check_batch_split(4, 0, mesh, ("data", "fsdp"))
  # A multiple of neither split nor its factors on one axis alone: 12 over 8 devices, and
  # 2 over data x fsdp = 2 x 4 (which only data divides).
  with pytest.raises(ValueError, match=r"batch_size=12 does not split .* use a multiple "
                     "of 8"):
    sharding.check_batch_split(12, 1, sharding.make_mesh({"data": 8}), ("data", "fsdp"))
  with pytest.raises(ValueError, match=r"batch_size=2 does not split .* \(8 ways\)"):
    sharding.check_batch_split(2, 1, sharding.make_mesh({"data": 2, "fsdp": 4}),
                               ("data", "fsdp"))


def test_malformed_rules_duplicates_and_the_batch_rule_are_named():
  # Each failed with a bare Python error or JAX's DuplicateSpecError naming no config
  # field; a "batch" rule was required though batches follow config.batch_axes alone.
  rules = list(sharding.DEFAULT_RULES)
  for entry in (("scalar", None, "x"), ("embed", 2), "embed", ("embed", ("fsdp", 1))):
    with pytest.raises(ValueError, match=r"config.rules\[11\] = .*: expected \(logical "
                       "axis, mesh axis"):
      sharding.check_rules(rules + [entry])
  with pytest.raises(ValueError, match=r"logical axis 'embed' is placed on \('fsdp', "
                     r"'fsdp'\), which names a mesh axis twice"):
    sharding.check_rules([("embed", ("fsdp", "fsdp")) if r[0] == "embed" else r
                          for r in rules])
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  with pytest.raises(ValueError, match=r"config.batch_axes=\('fsdp', 'fsdp'\) names a mesh "
                     "axis twice"):
    sharding.check_batch_split(2, 1, mesh, ("fsdp", "fsdp"))
  assert "batch" not in dict(rules)
  old_config = rules + [("batch", ("data", "fsdp"))]
  sharding.check_rules(old_config)  # accepted: it agrees with the default batch_axes
  sharding.check_batch_split(2, 1, mesh, ("data", "fsdp"), rules=old_config)
  with pytest.raises(ValueError, match=r"config.rules\[11\] = \('batch',\): expected"):
    sharding.check_batch_split(2, 1, mesh, ("data", "fsdp"), rules=rules + [("batch",)])
  with pytest.raises(ValueError, match=r"config.rules places logical axis 'batch' on "
                     r"\('tensor',\), but batches are split over config.batch_axes="
                     r"\('data', 'fsdp'\); the rule places nothing"):
    sharding.check_batch_split(2, 1, mesh, ("data", "fsdp"),
                               rules=rules + [("batch", "tensor")])


def test_batch_axes_that_also_split_the_heads_are_refused_with_the_batch():
  # The default rules put the heads on "tensor": a batch over it too passed the batch
  # check and failed at the step's trace (attention.partitioned), after the load.
  mesh = sharding.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  rules = list(sharding.DEFAULT_RULES)
  for old_rule in ([], [("batch", ("data", "tensor"))]):
    with pytest.raises(ValueError, match=r"config.batch_axes=\('data', 'tensor'\) and the "
                       r"attention heads \(config.rules: 'heads' on \('tensor',\)\) share "
                       r"mesh axes \['tensor'\]"):
      sharding.check_batch_split(4, 1, mesh, ("data", "tensor"), rules=rules + old_rule)
  sharding.check_batch_split(4, 1, mesh, ("data", "tensor"),
                             rules=[(n, None if n == "heads" else a) for n, a in rules])


def test_an_array_split_less_than_its_rules_counts_once(caplog):
  # A (16, 5) kernel whose 5 columns a 2-way tensor axis does not divide stays split over
  # fsdp; it was counted once per dimension and as whole on every device.
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2}, jax.devices()[:8])
  specs = {"w": jax.sharding.PartitionSpec("embed", "mlp")}
  shapes = {"w": jax.ShapeDtypeStruct((16, 5), jnp.float32)}
  with caplog.at_level("WARNING"):
    sh = sharding.shardings_for(specs, mesh, shapes)
  assert sh["w"].spec == jax.sharding.PartitionSpec("fsdp", None)
  text = caplog.text
  # 320 bytes split 4 ways instead of 8: 40 bytes more per device.
  assert "1 arrays are split less than the rules say, 0.0 MiB more per device" in text, text
  assert "['w'] (16, 5) not over tensor" in text
  # Sizes: a (1024, 1025) float32 kernel (4.0 MiB + 4 KiB) split 4 ways instead of 8:
  # 4.0/4 - 4.0/8 = 0.5 MiB more per device. Beside it a (512, 1025) one (2 MiB: 0.25 MiB
  # more) and an evenly split (1024, 1024) one; the three largest named largest first,
  # and the warning already at 0.75 / (4+2+4) MiB = 7.5% > 1% of the tree.
  caplog.clear()
  specs = {k: jax.sharding.PartitionSpec("embed", "mlp") for k in ("big", "even", "small")}
  shapes = {"big": jax.ShapeDtypeStruct((1024, 1025), jnp.float32),
            "even": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
            "small": jax.ShapeDtypeStruct((512, 1025), jnp.float32)}
  with caplog.at_level("WARNING"):
    sharding.shardings_for(specs, mesh, shapes)
  assert "2 arrays are split less than the rules say, 0.8 MiB more per device (the " \
         "tree: 10.0 MiB)" in caplog.text, caplog.text
  assert "['big'] (1024, 1025) not over tensor, ['small'] (512, 1025)" in caplog.text


def test_multi_slice_mesh_splits_physical_axes_as_one_slice_does():
  # Two fake v5e-64 slices (8 x 8 chips, hosts of 2 x 2): fsdp=16 inside a slice needs
  # a physical axis split; the one-slice mesh allowed it, the multi-slice one refused.
  class Chip:
    platform, device_kind, core_on_chip = "tpu", "TPU v5 lite", 0

    def __init__(self, i, coords, process, slice_index):
      self.id, self.coords = i, coords
      self.process_index, self.slice_index = process, slice_index

  def chips(sl):
    out = [Chip(sl * 1000 + y * 8 + x, (x, y, 0), sl * 16 + (y // 2) * 4 + x // 2, sl)
           for y in range(8) for x in range(8)]
    return sorted(out, key=lambda d: (d.process_index, d.id))

  ici = {"data": 4, "fsdp": 16, "tensor": 1}
  with mock.patch.object(sharding, "Mesh", lambda grid, names, axis_types: grid):
    assert sharding.make_mesh(ici, chips(0)).shape == (4, 16, 1)
    # Topology-aware: each fsdp line is one physical row of chips (a reshape of the
    # process-ordered list zigzags over the hosts' 2 x 2 blocks).
    square = sharding.make_mesh({"data": 8, "fsdp": 8}, chips(0))
    assert all(len({d.coords[1] for d in line}) == 1 for line in square[:, :, 0])
    grid = sharding.make_mesh(ici, chips(0) + chips(1), dcn_shape={"data": 2})
    # Two slices are not eight: processes are not taken for slices.
    with pytest.raises(ValueError, match=r"config.dcn_mesh \{'data': 8\} needs 8 slices, "
                       r"the devices are in 2"):
      sharding.make_mesh({"data": 1, "fsdp": 16}, chips(0) + chips(1), dcn_shape={"data": 8})
    # An ICI shape fit for 4 slices: the slice count is what is wrong, and said.
    with pytest.raises(ValueError, match=r"needs 4 slices, the devices are in 2"):
      sharding.make_mesh(ici, chips(0) + chips(1), dcn_shape={"data": 4})
  assert grid.shape == (8, 16, 1)
  # Only the DCN part of the data axis crosses slices.
  assert {d.slice_index for d in grid[:4].flat} == {0}
  assert {d.slice_index for d in grid[4:].flat} == {1}


def test_multi_slice_mesh_over_processes_where_devices_report_one_slice():
  # CPU processes (and GPU hosts) report slice_index 0 on every device: dcn_mesh failed
  # with JAX's "Number of slices 1 must equal ...", naming no config field.
  class Cpu:
    platform, device_kind = "cpu", "cpu"

    def __init__(self, i, process):
      self.id, self.process_index, self.slice_index = i, process, 0

  devices = [Cpu(i, i // 2) for i in range(4)]
  with mock.patch.object(sharding, "Mesh", lambda grid, names, axis_types: grid):
    grid = sharding.make_mesh({"fsdp": 2}, devices, dcn_shape={"data": 2})
    assert [[d.process_index for d in row.flat] for row in grid] == [[0, 0], [1, 1]]
    with pytest.raises(ValueError, match=r"config.dcn_mesh \{'data': 4\} needs 4 processes, "
                       r"the devices are in 2"):
      sharding.make_mesh({"fsdp": 1}, devices, dcn_shape={"data": 4})
    # More processes than slices: named as such too (not as the mesh within a slice).
    spread = [Cpu(i, i) for i in range(4)]
    with pytest.raises(ValueError, match=r"config.dcn_mesh \{'data': 2\} needs 2 processes, "
                       r"the devices are in 4"):
      sharding.make_mesh({"fsdp": 2}, spread, dcn_shape={"data": 2})


def test_a_mesh_axis_that_splits_neither_batch_nor_weights_is_refused():
  # data=4 with batch_axes=("fsdp",): every device along "data" ran the whole step on
  # the same rows (the tiny key-frame step: 0.62 XLA GFLOP per device instead of 0.11),
  # with the same losses and no word.
  rules = list(sharding.DEFAULT_RULES)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2}, jax.devices()[:8])
  with pytest.raises(ValueError, match=r"mesh axes \['data'\] split neither the batch "
                     r"\(config.batch_axes=\('fsdp',\)\) nor any weight"):
    sharding.check_batch_split(8, 1, mesh, ("fsdp",), rules=rules)
  sharding.check_batch_split(8, 1, mesh, ("data", "fsdp"), rules=rules)
  # "fsdp" splits the weights (the batch then only over "data"): allowed.
  sharding.check_batch_split(8, 1, mesh, ("data",), rules=rules)
  # A "batch" rule of an older config places no weight.
  with pytest.raises(ValueError, match=r"mesh axes \['data'\] split neither"):
    sharding.check_batch_split(8, 1, mesh, ("fsdp",), rules=rules + [("batch", ("fsdp",))])


def test_a_mesh_the_devices_do_not_fill_names_the_config_field():
  with pytest.raises(ValueError, match=r"needs 8 devices, have 4 \(config.mesh\)"):
    sharding.make_mesh({"data": 1, "fsdp": 8}, jax.devices()[:4])
  with pytest.raises(ValueError, match=r"do not divide into mesh .* \(config.mesh\)"):
    sharding.make_mesh({"data": -1, "fsdp": 3})
