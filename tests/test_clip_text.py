"""Parity of the Flax CLIP text encoder with transformers' CLIPTextModel.

Every torch weight is perturbed, the model is saved with `save_pretrained` and the
safetensors file is read back with numpy, so the test goes through the same file
format and key names as a real text_encoder/ folder.
"""

import json
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import max_rel_err, perturb_all_weights
from videoldm_jax.convert.clip_keys import clip_params_from_torch, clip_state_dict_from_ldm
from videoldm_jax.convert.torch_layout import ConversionError, flax_path_to_torch_key
from videoldm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, check_tokenizer

_TINY = dict(vocab_size=1001, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=77)
_EOS = 999


class _Case:
  """A perturbed transformers model, its saved state dict and the Flax counterpart."""

  def __init__(self, torch, tmp_dir, hidden_act, eos_token_id):
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file
    hf_cfg = transformers.CLIPTextConfig(**_TINY, hidden_act=hidden_act, bos_token_id=998,
                                         eos_token_id=eos_token_id, pad_token_id=_EOS)
    torch.manual_seed(0)
    self.torch_model = perturb_all_weights(transformers.CLIPTextModel(hf_cfg).eval(), torch)
    self.torch_model.save_pretrained(str(tmp_dir))
    self.state_dict = load_file(str(tmp_dir / "model.safetensors"))
    config_json = json.loads((tmp_dir / "config.json").read_text())
    self.config = CLIPTextConfig.from_transformers_config(config_json)
    self.model = CLIPTextModel(self.config)
    ids = jnp.zeros((1, 77), jnp.int32)
    self.abstract = flax.core.meta.unbox(
        jax.eval_shape(self.model.init, jax.random.key(0), ids)["params"])
    self.apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x, return_pooled=True))
    rng = np.random.default_rng(0)
    # SD-style batch: BOS, random tokens, EOS, then EOS padding; one full-length row.
    ids = rng.integers(0, 998, size=(3, 77))
    ids[:, 0] = 998
    ids[0, 9:] = _EOS
    # An id above the EOS id after it (e.g. a textual-inversion token appended to the
    # vocabulary): argmax pooling takes it, first-EOS pooling (the gelu case) does not.
    ids[0, 10] = 1000
    ids[1, 40:] = _EOS
    ids[2, -1] = _EOS
    self.ids = ids.astype(np.int32)
    with torch.no_grad():
      out = self.torch_model(input_ids=torch.from_numpy(self.ids).long())
    self.ref_hidden = out.last_hidden_state.numpy()
    self.ref_pooled = out.pooler_output.numpy()

  def errors(self, params):
    hidden, pooled = self.apply(params, self.ids)
    return max_rel_err(hidden, self.ref_hidden), max_rel_err(pooled, self.ref_pooled)


# (hidden_act, eos_token_id): SD 1.x style (quick_gelu, legacy eos id 2 -> argmax
# pooling) and SD 2.x / new-config style (gelu, pooling at the first EOS).
_CASES = [("quick_gelu", 2), ("gelu", _EOS)]


@pytest.fixture(scope="module", params=_CASES, ids=[c[0] for c in _CASES])
def case(request, torch_cpu, tmp_path_factory):
  act, eos = request.param
  return _Case(torch_cpu, tmp_path_factory.mktemp(act), act, eos)


def test_config_from_transformers_and_roundtrip(case):
  cfg = case.config
  assert cfg.hidden_act == case.torch_model.config.hidden_act
  assert cfg.num_hidden_layers == 2 and cfg.intermediate_size == 48
  assert CLIPTextConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="hidden_act"):
    CLIPTextConfig.from_transformers_config({**_TINY, "hidden_act": "relu"})
  with pytest.raises(ValueError, match="model_type"):
    CLIPTextConfig.from_transformers_config({**_TINY, "model_type": "t5"})
  with pytest.raises(ValueError, match="bogus"):
    CLIPTextConfig.from_dict({**cfg.to_dict(), "bogus": 1})
  # Fields the released encoders all share (1e-5, an eos id) are still read, not assumed.
  other = CLIPTextConfig.from_transformers_config(
      {**_TINY, "layer_norm_eps": 1e-6, "eos_token_id": None})
  assert other.layer_norm_eps == 1e-6 and other.eos_token_id is None  # None: argmax pooling
  # Missing fields are transformers' defaults (its CLIPTextConfig: ViT-L/14's encoder).
  from transformers import CLIPTextConfig as TransformersConfig
  ref, ours = TransformersConfig(), CLIPTextConfig.from_transformers_config({})
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "hidden_act",
                "layer_norm_eps", "eos_token_id"):
    assert getattr(ours, field) == getattr(ref, field), field
  with pytest.raises(ValueError, match=r"eos_token_id=\[2, 3\]: only a single EOS id"):
    CLIPTextConfig.from_transformers_config({**_TINY, "eos_token_id": [2, 3]})
  # Tokens past the position table (a tokenizer of a longer max_length) are refused:
  # every position read NaN.
  too_long = jnp.zeros((1, cfg.max_position_embeddings + 1), jnp.int32)
  with pytest.raises(ValueError, match=rf"sequence length {too_long.shape[1]} exceeds "
                     rf"max_position_embeddings={cfg.max_position_embeddings}"):
    jax.eval_shape(lambda: case.model.init(jax.random.key(0), too_long))


def test_flax_paths_map_to_transformers_keys(case):
  keys = {flax_path_to_torch_key(p)
          for p in flax.traverse_util.flatten_dict(case.abstract)}
  assert "embeddings.token_embedding.weight" in keys
  assert "encoder.layers.1.self_attn.q_proj.weight" in keys
  assert keys == set(case.torch_model.state_dict())


def test_parity_transformers_state_dict(case):
  sd = case.state_dict
  # Both spellings of a transformers checkpoint: without the prefix (transformers >= 5
  # save_pretrained) and with it plus the old persistent position_ids buffer.
  prefixed = {"text_model." + k: v for k, v in sd.items()}
  prefixed["text_model.embeddings.position_ids"] = np.arange(77)[None]
  # A CLIPTextModelWithProjection (SDXL's text_encoder_2): its head is not ours to read.
  prefixed["text_projection.weight"] = np.ones((16, 32), np.float32)
  for variant in (sd, prefixed):
    params = clip_params_from_torch(case.abstract, variant, source="test")
    err_hidden, err_pooled = case.errors(params)
    assert err_hidden < 1e-4, err_hidden
    assert err_pooled < 1e-4, err_pooled


@pytest.mark.parametrize("inner", ["", "text_model."])
def test_parity_ldm_single_file(case, inner):
  ldm = {f"cond_stage_model.transformer.{inner}{k}": v for k, v in case.state_dict.items()}
  ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
  ldm["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((4, 4, 3, 3), np.float32)
  ldm["first_stage_model.decoder.conv_in.weight"] = np.zeros((4, 4, 3, 3), np.float32)
  sd = clip_state_dict_from_ldm(ldm)
  assert all(k.startswith("text_model.") for k in sd)
  err_hidden, err_pooled = case.errors(clip_params_from_torch(case.abstract, sd, "test.ckpt"))
  assert err_hidden < 1e-4 and err_pooled < 1e-4, (err_hidden, err_pooled)


def test_ldm_openclip_and_empty_are_rejected():
  with pytest.raises(ValueError, match="OpenCLIP.*diffusers folder"):
    clip_state_dict_from_ldm({"cond_stage_model.model.token_embedding.weight": np.zeros(1)})
  with pytest.raises(ValueError, match="no CLIP text-encoder keys"):
    clip_state_dict_from_ldm({"model.diffusion_model.out.0.weight": np.zeros(1)})


def test_shape_mismatch_names_key_and_both_shapes(case):
  sd = dict(case.state_dict)
  sd["encoder.layers.1.mlp.fc1.weight"] = np.zeros((50, 32), np.float32)
  with pytest.raises(ConversionError) as info:
    clip_params_from_torch(case.abstract, sd, source="bad.safetensors")
  msg = str(info.value)
  assert "encoder.layers.1.mlp.fc1.weight" in msg and "bad.safetensors" in msg
  assert "(50, 32)" in msg and "(32, 48)" in msg


def test_missing_and_unused_keys_are_reported(case):
  sd = dict(case.state_dict)
  del sd["final_layer_norm.bias"]
  sd["encoder.layers.2.mlp.fc1.weight"] = np.zeros((48, 32), np.float32)
  with pytest.raises(ConversionError, match="missing: final_layer_norm.bias(.|\n)*"
                                            "unmapped: encoder.layers.2.mlp.fc1.weight"):
    clip_params_from_torch(case.abstract, sd, source="x")


def test_bfloat16_compute_close(case):
  params = clip_params_from_torch(case.abstract, case.state_dict, source="test")
  model = CLIPTextModel(case.config, dtype=jnp.bfloat16)
  hidden = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, case.ids)
  assert hidden.dtype == jnp.bfloat16
  assert max_rel_err(hidden.astype(jnp.float32), case.ref_hidden) < 5e-2
  # ... computed in bfloat16, not in float32 and cast at the end: the encoder's
  # matmuls take bfloat16 operands.
  jaxpr = str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, case.ids))
  assert any("dot_general" in line and "bf16[" in line for line in jaxpr.splitlines())


def test_a_tokenizer_past_the_embedding_table_is_refused():
  # Id vocab_size itself is past the table (rows 0..vocab_size - 1): every position of a
  # prompt holding it read NaN.
  tok = types.SimpleNamespace(encoder={"a": 0, "<new>": 300})
  check_tokenizer(tok, CLIPTextConfig(vocab_size=301), "folder")
  with pytest.raises(ValueError, match=r"folder: the tokenizer has token id 300 \('<new>'\) "
                     "but the text encoder's vocab_size is 300"):
    check_tokenizer(tok, CLIPTextConfig(vocab_size=300), "folder")
