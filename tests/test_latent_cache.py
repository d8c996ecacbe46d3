"""Latent cache: round trip equals a fresh encode; a cache refuses another VAE."""

import jax
import ml_collections
import numpy as np
import pytest

from videoldm_jax import pretrained
from videoldm_jax.data import latent_cache
from videoldm_jax.data.cache_latents import cache_examples, encode_examples
from videoldm_jax.data.procedural import make_clip
from videoldm_jax.models.tokenizer import CLIPTokenizer, write_byte_level_tokenizer

MODEL = ml_collections.ConfigDict(dict(
    seed=0,
    unet=dict(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(False, True),
              num_heads=2, cross_attention_dim=16, norm_num_groups=4),
    vae=dict(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4),
    text_encoder=dict(vocab_size=514, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=16),
    scheduler=dict(beta_schedule="scaled_linear")))


def _examples(n):
  for i in range(n):
    video, labels, caption = make_clip(i, 4, 16, 16, seed=3)
    yield {"video": video, "caption": caption, "index": i, **labels}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  write_byte_level_tokenizer(str(root / "tok"))
  tokenizer = CLIPTokenizer.from_folder(str(root / "tok"))
  model = pretrained.random_image_ldm(MODEL)
  info = cache_examples(model, _examples(5), str(root / "c"), num_examples=5, batch_size=2,
                        tokenizer=tokenizer, num_shards=2, source="procedural seed 3")
  return model, tokenizer, root / "c", info


def test_round_trip_equals_fresh_encode(setup):
  model, tokenizer, cache_dir, info = setup
  assert info["num_records"] == 5 and info["latent_shape"] == [4, 8, 8, 4]
  src = latent_cache.LatentCacheSource(cache_dir)
  fresh = list(encode_examples(model, _examples(5), batch_size=2, tokenizer=tokenizer))
  assert len(src) == 5
  for i in range(5):
    rec = src[i]
    assert rec["index"] == i and rec["caption"] == fresh[i]["caption"]
    np.testing.assert_array_equal(rec["latents"], fresh[i]["latents"])
    np.testing.assert_array_equal(rec["context"], fresh[i]["context"])
    assert rec["latents"].dtype == np.float32


def test_cache_refuses_another_vae_or_scale(setup):
  model, _, cache_dir, info = setup
  latent_cache.check_vae(info, model.vae_config.to_dict(), model.params["vae"], "cache")
  other = pretrained.random_image_ldm(ml_collections.ConfigDict({**MODEL.to_dict(), "seed": 1}))
  with pytest.raises(ValueError, match="other VAE weights"):
    latent_cache.check_vae(info, other.vae_config.to_dict(), other.params["vae"], "cache")
  scaled = dict(model.vae_config.to_dict(), scaling_factor=0.13025)
  with pytest.raises(ValueError, match="scaled by 0.18215.*uses 0.13025"):
    latent_cache.check_vae(info, scaled, model.params["vae"], "cache")


def test_incomplete_cache_is_refused(setup, tmp_path):
  _, _, cache_dir, _ = setup
  for f in cache_dir.glob("*.array_record"):
    (tmp_path / f.name).write_bytes(f.read_bytes())
  with pytest.raises(FileNotFoundError, match="not a \\(complete\\) latent cache"):
    latent_cache.LatentCacheSource(tmp_path)
