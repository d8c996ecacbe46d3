"""Latent cache: round trip equals a fresh encode; a cache refuses another VAE."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from videoldm_jax import pretrained
from videoldm_jax.data import latent_cache
from videoldm_jax.data.cache_latents import cache_examples, encode_examples
from videoldm_jax.data.procedural import make_clip
from videoldm_jax.models.vae import AutoencoderKL
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
  # And what the key-frame stage encodes on the fly (its pixels -> [-1, 1], the VAE
  # posterior's mean, shifted and scaled), computed here without the cache's code.
  video = np.stack([ex["video"] for ex in _examples(5)])
  mean, _ = AutoencoderKL(model.vae_config).apply(
      {"params": model.params["vae"]},
      video.reshape((-1,) + video.shape[2:]).astype(np.float32) / 127.5 - 1.0,
      method=AutoencoderKL.encode)
  c = model.vae_config
  want = ((np.asarray(mean) - c.shift_factor) * c.scaling_factor).reshape(
      video.shape[:2] + mean.shape[1:])
  np.testing.assert_allclose(np.stack([src[i]["latents"] for i in range(5)]), want,
                             rtol=1e-5, atol=1e-5)
  # Each clip's text embedding is its own caption's, by the text encoder alone.
  from videoldm_jax.models.clip_text import CLIPTextModel
  ids = tokenizer([ex["caption"] for ex in _examples(5)],
                  max_length=model.text_config.max_position_embeddings)
  want = CLIPTextModel(model.text_config).apply({"params": model.params["text_encoder"]},
                                                np.asarray(ids))
  np.testing.assert_allclose(np.stack([src[i]["context"] for i in range(5)]), want,
                             rtol=1e-5, atol=1e-5)
  assert len({ex["caption"] for ex in _examples(5)}) > 1  # (so the rows differ)


def _check(info, model, text_params=None, **kw):
  latent_cache.check_cache(
      info, "cache", vae_config=model.vae_config.to_dict(),
      fingerprints=latent_cache.model_fingerprints(model.params["vae"], text_params,
                                                   whole_vae=True), **kw)


def test_cache_refuses_another_vae_scale_text_encoder_or_clip_size(setup):
  model, _, cache_dir, info = setup
  text = model.params["text_encoder"]
  data = ml_collections.ConfigDict(dict(num_frames=4, height=16, width=16))
  _check(info, model, text_params=text, needs_context=True, data=data,
         text_config=model.text_config.to_dict())
  other = pretrained.random_image_ldm(ml_collections.ConfigDict({**MODEL.to_dict(), "seed": 1}))
  with pytest.raises(ValueError, match="other VAE weights"):
    _check(info, other)
  scaled = dict(model.vae_config.to_dict(), scaling_factor=0.13025)
  with pytest.raises(ValueError, match="scaled by 0.18215.*uses 0.13025"):
    latent_cache.check_cache(info, "cache", vae_config=scaled,
                             fingerprints=latent_cache.model_fingerprints(model.params["vae"]))
  with pytest.raises(ValueError, match="text embeddings from other text-encoder weights"):
    _check(info, model, text_params=other.params["text_encoder"], needs_context=True)
  # The same weights under another config (an activation) give other embeddings.
  gelu = dict(model.text_config.to_dict(), hidden_act="gelu")
  with pytest.raises(ValueError, match="text embeddings from a text encoder with config"):
    _check(info, model, text_params=text, needs_context=True, text_config=gelu)
  with pytest.raises(ValueError, match="holds no text embeddings .* rebuild the cache with "
                     "--text"):
    _check(dict(info, has_context=False), model, needs_context=True)
  # 16 px frames at the VAE's factor 2: latents (4, 8, 8, 4).
  with pytest.raises(ValueError, match=r"clips of 4 frames of 16x16 pixels \(latents "
                     r"\[4, 8, 8, 4\]\), the config asks for data.num_frames=8"):
    _check(info, model, data=ml_collections.ConfigDict(dict(num_frames=8, height=16,
                                                            width=16)))
  # Only the encoder decides the latents: a decoder-stage export of the same model
  # (temporal decoder leaves added, spatial decoder retrained) feeds from this cache.
  vae = dict(model.params["vae"])
  vae["decoder"] = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1.0, vae["decoder"])
  vae["decoder"] = {**vae["decoder"], "temporal_conv_out": {"kernel": np.ones((3, 1, 1, 3, 3))}}
  latent_cache.check_cache(info, "cache", vae_config=model.vae_config.to_dict(),
                           fingerprints=latent_cache.model_fingerprints(vae))
  # Caches written before the encoder fingerprint: the whole frame-wise VAE's.
  old = {k: v for k, v in info.items() if k != "encoder_fingerprint"}
  old["vae_fingerprint"] = latent_cache.params_fingerprint(model.params["vae"])
  _check(old, model)
  with pytest.raises(ValueError, match="other VAE weights"):
    _check(old, other)
  with pytest.raises(ValueError, match="num_shards must be >= 1"):
    latent_cache.write_cache(cache_dir.parent / "none", [], vae_config={}, vae_params={},
                             num_shards=0)


def test_tfds_text_fields_as_bytes_are_cached_as_text(setup, tmp_path):
  """TFDS returns Text features (caption, path) as bytes: they are stored as str, and
  the caption's embedding is that of its text, not of its repr."""
  model, tokenizer, _, _ = setup
  as_tfds = [{**ex, "caption": ex["caption"].encode(), "path": f"/v/{i}.mp4".encode()}
             for i, ex in enumerate(_examples(3))]
  # A NumPy string scalar (indexing a caption column): written, then unreadable.
  as_tfds[2]["caption"] = np.array([as_tfds[2]["caption"].decode()])[0]
  assert isinstance(as_tfds[2]["caption"], np.str_)
  cache_examples(model, as_tfds, str(tmp_path / "c"), batch_size=2, tokenizer=tokenizer)
  src = latent_cache.LatentCacheSource(tmp_path / "c")
  fresh = list(encode_examples(model, _examples(3), batch_size=2, tokenizer=tokenizer))
  for i in range(3):
    rec = src[i]
    assert rec["caption"] == fresh[i]["caption"] and rec["path"] == f"/v/{i}.mp4"
    np.testing.assert_array_equal(rec["context"], fresh[i]["context"])
  mixed = [dict(ex, path=f"/v/{i}.mp4") for i, ex in enumerate(_examples(2))]
  mixed[1]["video"] = mixed[1]["video"][:2]
  with pytest.raises(ValueError, match=r"example 1 \(/v/1.mp4\): video of shape "
                     r"\(2, 16, 16, 3\), the first was \(4, 16, 16, 3\)"):
    list(encode_examples(model, mixed, batch_size=2))
  with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
    list(encode_examples(model, mixed, batch_size=0))  # was: every clip in one batch


def test_cache_iterator_resumes_on_another_process_count(tmp_path, monkeypatch, caplog):
  """After n global batches, a resume with 1 or 2 processes reads on exactly where the
  uninterrupted run goes on (the Grain index counts elements, not batches)."""
  from videoldm_jax.data import inputs
  vae_config = {"scaling_factor": 0.5, "block_out_channels": [1]}  # factor 1
  vae_params = {"w": np.ones(3, np.float32)}
  latent_cache.write_cache(
      tmp_path / "c", ({"latents": np.full((1, 1, 1, 1), i, np.float32), "index": i,
                        "crowdedness": i % 3, "score": i + 0.5} for i in range(16)),
      vae_config=vae_config, vae_params=vae_params, num_shards=3)
  data = ml_collections.ConfigDict(dict(cache_dir=str(tmp_path / "c"), batch_size=4,
                                       num_frames=1, height=1, width=1))
  check = {"vae_config": vae_config,
           "fingerprints": latent_cache.model_fingerprints(vae_params)}

  def run(pc, pi, state=None, n=3):
    it = inputs.ShareIterator(iter(inputs._cache_dataset(data, 0, pi, pc, check, "label")),
                              4 // pc, pc)
    if state:
      it.set_state(state)
    return it, [next(it)["latents"].reshape(-1).tolist() for _ in range(n)]

  _, whole = run(1, 0, n=6)
  it, _ = run(1, 0)
  state = it.get_state()
  _, a = run(2, 0, state)
  _, b = run(2, 1, state)
  assert [x + y for x, y in zip(a, b)] == whole[3:]
  assert run(1, 0, state)[1] == whole[3:]
  # config.seed orders the cache: another seed, another first batch.
  other = next(iter(inputs._cache_dataset(data, 1, 0, 1, check, "label")))
  assert other["latents"].reshape(-1).tolist() != whole[0]
  # A resume that reads other global batches than the checkpoint did is refused.
  with pytest.raises(ValueError, match="the checkpoint read global batches of 4, this run "
                     "reads 8; resuming would skip or repeat examples"):
    inputs.ShareIterator(iter([]), 4, 2).set_state(state)
  # A checkpoint written before the fix stored the index of batches: still resumed right.
  old = dict(state, grain={"next_index": 3})
  assert run(1, 0, old)[1] == whole[3:]
  # The trainer's iterator (make_iterator) reads this process's half (JAX's index).
  import jax
  config = ml_collections.ConfigDict(dict(seed=0, data=dict(data.to_dict(),
                                                            kind="latent_cache")))
  monkeypatch.setattr(jax, "process_count", lambda *a: 2)
  halves = []
  for pi in range(2):
    monkeypatch.setattr(jax, "process_index", lambda *a, _pi=pi: _pi)
    halves.append(next(inputs.make_iterator(config, tmp_path, check))["latents"]
                  .reshape(-1).tolist())
  assert halves[0] + halves[1] == whole[0]
  # A resume with another config.seed is refused: the position counts elements of the
  # seed's permutation, and the rest of the epoch under another one re-read batches
  # already read (the procedural source refused it; this one took it with a NOTE).
  monkeypatch.setattr(jax, "process_count", lambda *a: 1)
  monkeypatch.setattr(jax, "process_index", lambda *a: 0)
  it = inputs.make_iterator(config, tmp_path, check)
  next(it)
  saved = it.get_state()
  with pytest.raises(ValueError, match="the checkpoint's pipeline was shuffled with "
                     "config.seed=0, this run's is 1; resuming would repeat and skip "
                     "examples: resume with the checkpoint's config.seed=0"):
    inputs.make_iterator(ml_collections.ConfigDict(dict(config.to_dict(), seed=1)),
                         tmp_path, check).set_state(saved)
  resumed = inputs.make_iterator(config, tmp_path, check)
  with caplog.at_level("WARNING"):
    resumed.set_state(saved)
  assert next(resumed)["latents"].reshape(-1).tolist() == whole[1]
  assert saved["num_examples"] == 16 and "examples" not in caplog.text
  # A cache of another size (rebuilt, grown): the position is in another permutation;
  # said, not refused (the run goes on, its epoch partly repeated).
  with caplog.at_level("WARNING"):
    inputs.make_iterator(config, tmp_path, check).set_state({**saved, "num_examples": 12})
  assert ("the checkpoint's dataset had 12 examples, this run's has 16 (rebuilt or "
          "another one?)") in caplog.text
  # Labels come from config.data.label_field, as int32 (the records' own values).
  config.data.label_field = "crowdedness"
  batch = next(inputs.make_iterator(config, tmp_path, check))
  assert batch["labels"].dtype == np.int32
  assert batch["labels"].tolist() == [int(x) % 3 for x in batch["latents"].reshape(-1)]
  assert "labels" not in next(inputs.ShareIterator(
      iter(inputs._cache_dataset(data, 0, 0, 1, check, "label")), 4, 1))
  # A float field as the label is refused, not truncated to an integer.
  with pytest.raises(ValueError, match=r"a record: label field 'score' must be one "
                     r"integer .* got ndarray array\(\d+\.5"):
    next(inputs.ShareIterator(iter(inputs._cache_dataset(data, 0, 0, 1, check, "score")),
                              4, 1))


def test_incomplete_cache_is_refused(setup, tmp_path):
  _, _, cache_dir, _ = setup
  for f in cache_dir.glob("*.array_record"):
    (tmp_path / f.name).write_bytes(f.read_bytes())
  with pytest.raises(FileNotFoundError, match="not a \\(complete\\) latent cache"):
    latent_cache.LatentCacheSource(tmp_path)
  # An unset cache_dir read the working directory ("": no cache_info.json).
  with pytest.raises(ValueError, match="config.data.cache_dir is empty"):
    latent_cache.LatentCacheSource("")


def test_cache_files_shapes_and_records_are_checked(tmp_path):
  # Non-square clips by their (height, width); a truncated copy; records of another
  # shape or context than the first; string arrays; indices outside the cache; an
  # info file that is not a JSON object.
  vae_config = {"scaling_factor": 0.5, "block_out_channels": [1]}  # factor 1
  vae_params = {"w": np.ones(3, np.float32)}
  info = latent_cache.write_cache(
      tmp_path / "c", ({"latents": np.full((1, 2, 1, 1), i, np.float32)} for i in range(3)),
      vae_config=vae_config, vae_params=vae_params)
  check = dict(vae_config=vae_config, fingerprints=latent_cache.model_fingerprints(vae_params))
  size = lambda h, w: ml_collections.ConfigDict(dict(num_frames=1, height=h, width=w))
  latent_cache.check_cache(info, "c", data=size(2, 1), **check)
  with pytest.raises(ValueError, match=r"c: holds clips of 1 frames of 2x1 pixels"):
    latent_cache.check_cache(info, "c", data=size(1, 2), **check)
  source = latent_cache.LatentCacheSource(tmp_path / "c")
  for index in (-1, 3):
    with pytest.raises(IndexError, match=f"record {index} of 3"):
      source[index]
  info_file = tmp_path / "c" / latent_cache.INFO_FILE
  info_file.write_text(info_file.read_text().replace('"num_records": 3', '"num_records": 4'))
  with pytest.raises(ValueError, match="files hold 3 records, cache_info.json says 4 "
                     r"\(truncated copy\?\)"):
    latent_cache.LatentCacheSource(tmp_path / "c")
  info_file.write_text("[1, 2]")
  with pytest.raises(ValueError, match="cache_info.json: expected a JSON object, got a list"):
    latent_cache.LatentCacheSource(tmp_path / "c")
  for i, second in enumerate(({"latents": np.zeros((1, 1, 1, 1), np.float32)},
                              {"latents": np.zeros((1, 2, 1, 1), np.float32),
                               "context": np.zeros((3, 4), np.float32)})):
    with pytest.raises(ValueError, match=r"record 1 has latents \[1, \d, 1, 1\]"):
      latent_cache.write_cache(tmp_path / f"mixed{i}", [
          {"latents": np.zeros((1, 2, 1, 1), np.float32)}, second],
          vae_config=vae_config, vae_params=vae_params)
  with pytest.raises(TypeError, match="record field 'x': <U1 arrays cannot be cached"):
    latent_cache.encode_record({"x": np.array(["a", "b"])})


def test_odd_frame_counts_are_padded_for_the_devices_and_cut_back(setup):
  # 3 frames per batch on the 8 devices: 5 padding rows, none in the records. NumPy
  # scalar fields (TFDS gives labels as np.int64) are carried.
  model = setup[0]
  clips = [dict(video=make_clip(i, 3, 16, 16, seed=3)[0], index=np.int64(i)) for i in range(3)]
  records = list(encode_examples(model, clips, batch_size=1))
  frames = np.stack([c["video"] for c in clips]).reshape(-1, 16, 16, 3) / 127.5 - 1
  mean, _ = AutoencoderKL(model.vae_config).apply(
      {"params": model.params["vae"]}, jnp.asarray(frames, jnp.float32),
      method=AutoencoderKL.encode)
  c = model.vae_config
  np.testing.assert_allclose(np.stack([r["latents"] for r in records]).reshape(mean.shape),
                             (np.asarray(mean) - c.shift_factor) * c.scaling_factor, atol=1e-5)
  assert [r["index"] for r in records] == [0, 1, 2]


def test_clips_without_captions_are_counted_in_a_warning(setup, caplog):
  # A text-conditioned cache of empty prompts would train an unconditional model.
  model, tokenizer = setup[:2]
  clips = [{k: v for k, v in ex.items() if k != "caption" or i == 0}
           for i, ex in enumerate(_examples(3))]
  with caplog.at_level("WARNING"):
    records = list(encode_examples(model, clips, batch_size=2, tokenizer=tokenizer))
  assert len(records) == 3
  assert "2 of 3 clips have no 'caption' field" in caplog.text


def test_fingerprints_cover_every_encoder_leaf_by_path_in_any_order(setup):
  vae = dict(setup[0].params["vae"])
  before = latent_cache.model_fingerprints(vae)["encoder"]
  vae["quant_conv"] = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1, vae["quant_conv"])
  assert latent_cache.model_fingerprints(vae)["encoder"] != before  # it shapes the latents
  x, y = np.zeros(2, np.float32), np.ones(2, np.float32)
  f = latent_cache.params_fingerprint
  assert f({"a": x, "b": y}) != f({"a": y, "b": x}) and f({"a": x}) != f({"b": x})
  assert f({"a": x, "b": y}) == f({"b": y, "a": x})  # (a restored tree's key order)


def test_cache_writes_and_checks_by_hand(tmp_path):
  vae_config, vae_params = {"scaling_factor": 0.5, "block_out_channels": [1]}, {"w": np.ones(3)}
  kw = dict(vae_config=vae_config, vae_params=vae_params)
  with pytest.raises(ValueError, match="no records to cache"):
    latent_cache.write_cache(tmp_path / "empty", [], **kw)
  record = {"latents": np.zeros((4, 2, 2, 1), np.float32), "context": np.zeros((2, 3), np.float32)}
  info = latent_cache.write_cache(tmp_path / "c", [record], **kw,
                                  text_params={"t": np.ones(2)}, text_config={"x": 1})
  with pytest.raises(FileExistsError, match="already holds a latent cache"):
    latent_cache.write_cache(tmp_path / "c", [record], **kw)
  check = lambda **more: latent_cache.check_cache(
      info, "c", vae_config=vae_config,
      fingerprints=latent_cache.model_fingerprints(vae_params), **more)
  # Clips of exactly the configured size: smaller ones too are another size.
  for t, h, w in ((2, 2, 2), (4, 1, 2), (4, 2, 1)):
    with pytest.raises(ValueError, match="holds clips of 4 frames of 2x2"):
      check(data=ml_collections.ConfigDict(dict(num_frames=t, height=h, width=w)))
  # A UNet without a text encoder of its own trains on the cached embeddings.
  check(needs_context=True)
  # Another VAE config with the same weights and scale (a shift factor moves every
  # latent: (mean - shift) * scale) made other latents.
  with pytest.raises(ValueError, match="made by a VAE with config"):
    latent_cache.check_cache(info, "c", vae_config={**vae_config, "shift_factor": 0.1},
                             fingerprints=latent_cache.model_fingerprints(vae_params))
  # A cache written before cache_info.json had has_context: read from its first record.
  for name, rec in (("c", record), ("no_text", {"latents": record["latents"]})):
    if name == "no_text":
      latent_cache.write_cache(tmp_path / name, [rec], **kw)
    info_file = tmp_path / name / latent_cache.INFO_FILE
    old = json.loads(info_file.read_text())
    del old["has_context"]
    info_file.write_text(json.dumps(old))
    assert latent_cache.LatentCacheSource(tmp_path / name).info["has_context"] == (name == "c")
