"""Parity of the pure-Python CLIP tokenizer with transformers' CLIPTokenizer.

A tiny vocabulary is built here: the 256 byte symbols, their `</w>` variants, merges
learnt by a few steps of BPE on a small corpus, and the two special tokens. The
reference is transformers' CLIPTokenizer loaded from the same folder (transformers 5
only ships the `tokenizers`-backed one).
"""

import collections
import json

import numpy as np
import pytest

from videoldm_jax.models.tokenizer import CLIPTokenizer, bytes_to_unicode

_CORPUS = ("a photo of a cat riding a horse on the moon, high quality photograph of the "
           "astronaut. there's the other one; it's 2024 and they're here! the the then "
           "that this those photos cats horses moons don't won't shouldn't")
_NUM_MERGES = 48

TEXTS = [
    "a photo of a cat",
    "A PHOTO of the Astronaut,  riding\ta horse\n on the MOON!!!",
    "there's 12345 cats, they're here; it's 3.14 & 100% \"quoted\" (parens) [x]{y}",
    "don't won't I'm we've you'll he'd",
    "naïve café Über straße ñandú 東京 😀 🐱‍👤 Ελληνικά",
    # Word-final capital sigmas (their own entry: within the 75 tokens kept).
    "Σ ΟΔΟΣ ΣΟΦΟΣ photo ΑΣ.",
    "e\u0301 combining accent, non\u00a0breaking\u3000space",
    "",
    "   ",
    "a photo <|endoftext|> of <|startoftext|>a cat",
    "aaa aaaa thethe",
    "IT'S !'s x'S '''' <|ENDOFTEXT|> x\x1cy \x00\x7f",
    " ".join(["photograph of the astronaut riding a horse"] * 20),
]


def _learn_bpe(corpus: str, n: int) -> list[tuple[str, str]]:
  """A few greedy BPE steps on byte-mapped words (last symbol with `</w>`)."""
  b2u = bytes_to_unicode()
  words = collections.Counter(
      "".join(b2u[b] for b in w.encode()) for w in corpus.lower().split())
  seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
  merges = []
  for _ in range(n):
    counts = collections.Counter()
    for w, s in seqs.items():
      for pair in zip(s[:-1], s[1:]):
        counts[pair] += words[w]
    if not counts:
      break
    best = max(sorted(counts), key=lambda p: counts[p])
    merges.append(best)
    for w, s in seqs.items():
      out, i = [], 0
      while i < len(s):
        if i < len(s) - 1 and (s[i], s[i + 1]) == best:
          out.append(s[i] + s[i + 1])
          i += 2
        else:
          out.append(s[i])
          i += 1
      seqs[w] = out
  return merges


def _vocab_and_merges():
  base = list(bytes_to_unicode().values())
  merges = _learn_bpe(_CORPUS, _NUM_MERGES)
  tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}, merges


def _write_slow_folder(path, pad_token="<|endoftext|>", max_length=77):
  path.mkdir(parents=True, exist_ok=True)
  vocab, merges = _vocab_and_merges()
  (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (path / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
  special = {"bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True,
                           "rstrip": False, "single_word": False},
             "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}
  (path / "special_tokens_map.json").write_text(json.dumps(special))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {**special, "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer",
       "do_lower_case": True}))
  return path


@pytest.fixture(scope="module")
def hf_clip_tokenizer():
  transformers = pytest.importorskip("transformers")
  return transformers.CLIPTokenizer


def _reference(hf_cls, folder, texts, max_length=77):
  tok = hf_cls.from_pretrained(str(folder))
  return np.asarray(tok(texts, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np")["input_ids"], np.int64), tok


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_vocab_merges_folder_matches_transformers(tmp_path, hf_clip_tokenizer, pad_token):
  folder = _write_slow_folder(tmp_path, pad_token=pad_token)
  ref, hf = _reference(hf_clip_tokenizer, folder, TEXTS)
  ours = CLIPTokenizer.from_folder(str(folder))
  ids = ours(TEXTS)
  assert ids.shape == (len(TEXTS), 77) and ids.dtype == np.int32
  assert ours.pad_token_id == hf.pad_token_id
  for text, a, b in zip(TEXTS, ids, ref):
    np.testing.assert_array_equal(a, b, err_msg=repr(text))
  # Truncation keeps BOS and EOS.
  assert ids[-1, 0] == ours.bos_token_id and ids[-1, -1] == ours.eos_token_id
  # The empty string is BOS, EOS, then padding.
  assert list(ids[TEXTS.index(""), :3]) == [ours.bos_token_id, ours.eos_token_id, ours.pad_token_id]


def test_tokenizer_json_folder_matches_transformers(tmp_path, hf_clip_tokenizer):
  slow = _write_slow_folder(tmp_path / "slow")
  tok = hf_clip_tokenizer.from_pretrained(str(slow))
  fast_dir = tmp_path / "fast"
  tok.save_pretrained(str(fast_dir))
  data = json.loads((fast_dir / "tokenizer.json").read_text(encoding="utf-8"))
  # The other spelling of merges that tokenizer.json files use.
  pairs = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
  for name, merges in (("lists", pairs), ("strings", [" ".join(p) for p in pairs])):
    folder = tmp_path / name
    folder.mkdir()
    data["model"]["merges"] = merges
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False),
                                           encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    ours = CLIPTokenizer.from_folder(str(folder))
    assert ours.model_max_length == 16
    ref, _ = _reference(hf_clip_tokenizer, slow, TEXTS, max_length=16)
    np.testing.assert_array_equal(ours(TEXTS), ref)
  with pytest.raises(ValueError, match="max_length=1 leaves no room for BOS/EOS"):
    ours("a", max_length=1)  # (a numpy broadcast error)


def test_missing_files_name_folder_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    CLIPTokenizer.from_folder(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    CLIPTokenizer.from_folder(str(tmp_path / "nope"))
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    CLIPTokenizer.from_folder(str(tmp_path))


def test_defaults_without_config_files(tmp_path):
  folder = _write_slow_folder(tmp_path)
  (folder / "special_tokens_map.json").unlink()
  (folder / "tokenizer_config.json").unlink()
  tok = CLIPTokenizer.from_folder(str(folder))
  assert tok.model_max_length == 77
  assert tok.pad_token_id == tok.eos_token_id
  assert tok(["a cat", "x"]).shape == (2, 77)


def test_added_tokens_are_split_out_as_transformers_does(tmp_path, hf_clip_tokenizer):
  # Textual inversion adds tokens; transformers matches them whole, after lowercasing
  # for the `normalized` ones (add_tokens' default), before any BPE.
  tok = hf_clip_tokenizer.from_pretrained(str(_write_slow_folder(tmp_path / "slow")))
  assert tok.add_tokens(["<cat-toy>", "sks"]) == 2
  # Normalised added tokens match in the normalised text by their normalised content
  # ("my  tok" and "MY\ttok" are "my tok"; a decomposed é in a token matches the
  # precomposed one), which matching the raw text missed.
  assert tok.add_tokens(["my tok", "cafe\u0301x", "‹ΣΣ>"]) == 3
  tok.save_pretrained(str(tmp_path / "ti"))
  texts = ["a photo of <cat-toy> riding", "<CAT-Toy><cat-toy> sks dog", "asksk", "<cat-toy",
           "a my  tok b", "a MY\ttok", "caféx", "cafe\u0301X", "‹σς>", "‹ΣΣ>"]
  ref = np.asarray(tok(texts, padding="max_length", truncation=True, max_length=16,
                       return_tensors="np")["input_ids"])
  assert tok.convert_tokens_to_ids("my tok") in ref[4]  # the case that must match
  ours = CLIPTokenizer.from_folder(str(tmp_path / "ti"))
  np.testing.assert_array_equal(ours(texts, max_length=16), ref)
  assert ours.encode("<cat-toy>") == [tok.convert_tokens_to_ids("<cat-toy>")]
  # The slow tokenizers' added_tokens.json beside vocab.json + merges.txt.
  slow = _write_slow_folder(tmp_path / "slow_added")
  n = len(json.loads((slow / "vocab.json").read_text(encoding="utf-8")))
  (slow / "added_tokens.json").write_text(json.dumps({"<cat-toy>": n}))
  assert CLIPTokenizer.from_folder(str(slow)).encode("a <cat-toy>")[-1] == n
  # Multi-vector textual inversion: <cat-toy>_1 has <cat-toy> as a prefix (longest
  # first), and the file's tokens match case-insensitively (normalized), as transformers.
  (slow / "added_tokens.json").write_text(json.dumps({"<cat-toy>": n, "<cat-toy>_1": n + 1}))
  hf, ours = hf_clip_tokenizer.from_pretrained(str(slow)), CLIPTokenizer.from_folder(str(slow))
  for text in ("a <cat-toy>_1 <cat-toy>", "a <CAT-Toy> x"):
    assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
  assert ours.encode("a <cat-toy>_1 <cat-toy>")[1:] == [n + 1, n]
  # A converted or exported model folder keeps them (its tokenizer is copied).
  from videoldm_jax import pretrained
  pretrained.copy_tokenizer(slow, tmp_path / "copied")
  assert CLIPTokenizer.from_folder(str(tmp_path / "copied")).encode("a <cat-toy>")[-1] == n


def test_special_tokens_map_wins_over_a_legacy_config(tmp_path, hf_clip_tokenizer):
  # SD 2.x tokenizer folders: special_tokens_map.json pads with "!" (id 0) while
  # tokenizer_config.json (no added_tokens_decoder) says <|endoftext|>; transformers
  # pads with "!", and every padded position of the text embedding depends on it.
  folder = _write_slow_folder(tmp_path, pad_token="!")
  config = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(
      json.dumps({**config, "pad_token": "<|endoftext|>"}))
  ref, hf = _reference(hf_clip_tokenizer, folder, TEXTS[:3], max_length=12)
  ours = CLIPTokenizer.from_folder(str(folder))
  assert ours.pad_token == hf.pad_token == "!"
  np.testing.assert_array_equal(ours(TEXTS[:3], max_length=12), ref)


@pytest.mark.parametrize("merges", [[("b", "c</w>"), ("a", "b")], [("a", "b"), ("b", "c</w>")]])
def test_the_earlier_of_two_competing_merges_wins(tmp_path, hf_clip_tokenizer, merges):
  # "abc" can merge a+b or b+c</w>: the merge listed first applies. The learned merges
  # of the other tests hardly ever compete, so a reversed priority passed them all.
  base = list(bytes_to_unicode().values())
  tokens = base + [b + "</w>" for b in base] + ["bc</w>", "ab", "<|startoftext|>",
                                                "<|endoftext|>"]
  (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (tmp_path / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  ours = CLIPTokenizer.from_folder(str(tmp_path))
  expected = ["a", "bc</w>"] if merges[0] == ("b", "c</w>") else ["ab", "c</w>"]
  assert ours.tokenize("abc") == hf_clip_tokenizer.from_pretrained(str(tmp_path)).tokenize(
      "abc") == expected
  ref, _ = _reference(hf_clip_tokenizer, tmp_path, ["abc abc"], max_length=8)
  np.testing.assert_array_equal(ours(["abc abc"], max_length=8), ref)


def test_added_tokens_decoder_config_wins_over_special_tokens_map(tmp_path,
                                                                  hf_clip_tokenizer):
  # With added_tokens_decoder (transformers >= 4.34 files) tokenizer_config.json's own
  # special tokens count, as transformers reads them: the map's "!" pad is not used.
  folder = _write_slow_folder(tmp_path, pad_token="!")
  config = json.loads((folder / "tokenizer_config.json").read_text())
  vocab = json.loads((folder / "vocab.json").read_text())
  decoder = {str(vocab[t]): {"content": t, "special": True, "normalized": False,
                             "lstrip": False, "rstrip": False, "single_word": False}
             for t in ("<|startoftext|>", "<|endoftext|>")}
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {**config, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
       "added_tokens_decoder": decoder}))
  ref, hf = _reference(hf_clip_tokenizer, folder, TEXTS[:3], max_length=12)
  ours = CLIPTokenizer.from_folder(str(folder))
  assert ours.pad_token == hf.pad_token == "<|endoftext|>"
  np.testing.assert_array_equal(ours(TEXTS[:3], max_length=12), ref)


def test_unreadable_files_are_named(tmp_path, hf_clip_tokenizer):
  """A broken file of the folder was a bare JSONDecodeError / TypeError naming no file;
  a GPT-2-style BPE (no `</w>` word ends) loaded and turned most words into unk."""
  good = _write_slow_folder(tmp_path / "good")
  cases = {
      "vocab.json": ("version https://git-lfs.github.com/spec/v1\n", r"vocab.json: not a JSON"),
      "tokenizer_config.json": (json.dumps({"model_max_length": "77"}),
                                r"tokenizer_config.json: model_max_length='77', expected"),
      "merges.txt": (b"#version: 0.2\n\xff\xfe a b\n", r"merges.txt: not UTF-8"),
  }
  for name, (content, message) in cases.items():
    folder = tmp_path / name
    folder.mkdir()
    for f in good.iterdir():
      (folder / f.name).write_bytes(f.read_bytes())
    if isinstance(content, bytes):
      (folder / name).write_bytes(content)
    else:
      (folder / name).write_text(content)
    with pytest.raises(ValueError, match=message):
      CLIPTokenizer.from_folder(str(folder))
  # An added_tokens entry without its content or id was a bare KeyError naming no file.
  for entry in ({"id": 5, "special": True}, {"content": "<x>", "id": "5"}, "<x>"):
    broken = tmp_path / f"added_{len(str(entry))}"
    broken.mkdir()
    (broken / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": {}, "merges": []},
        "added_tokens": [entry]}))
    with pytest.raises(ValueError, match=r"tokenizer.json: added_tokens\[0\]=.*: expected "
                       "an object with a string `content` and an integer `id`"):
      CLIPTokenizer.from_folder(str(broken))
  listed = tmp_path / "list"
  listed.mkdir()
  (listed / "tokenizer.json").write_text("[]")
  with pytest.raises(ValueError, match=r"tokenizer.json: expected a JSON object, got a list"):
    CLIPTokenizer.from_folder(str(listed))
  no_specials = tmp_path / "no_specials"
  no_specials.mkdir()
  (no_specials / "vocab.json").write_text(json.dumps({"a</w>": 0}))
  (no_specials / "merges.txt").write_text("")
  with pytest.raises(ValueError, match=rf"{no_specials}.*bos_token '<\|startoftext\|>' is not"):
    CLIPTokenizer.from_folder(str(no_specials))
  # Integral floats, as some files write them (1e+30: no limit, CLIP's 77 stands).
  for value, expected in ((77.0, 77), (1e30, 77)):
    copy = tmp_path / f"float_{value:g}"
    copy.mkdir()
    for f in good.iterdir():
      (copy / f.name).write_bytes(f.read_bytes())
    (copy / "tokenizer_config.json").write_text(json.dumps({"model_max_length": value}))
    assert CLIPTokenizer.from_folder(str(copy)).model_max_length == expected
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    CLIPTokenizer.from_folder(str(good / "vocab.json"))
  # A GPT-2-style byte-level BPE: words start with "Ġ", no "</w>" anywhere.
  tok = hf_clip_tokenizer.from_pretrained(str(good))
  tok.save_pretrained(str(tmp_path / "fast"))
  data = json.loads((tmp_path / "fast" / "tokenizer.json").read_text(encoding="utf-8"))
  data["model"]["end_of_word_suffix"] = None
  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
  with pytest.raises(ValueError, match=r"end_of_word_suffix=None, CLIP uses '</w>'"):
    CLIPTokenizer.from_folder(str(gpt2))
  (gpt2 / "tokenizer.json").unlink()
  vocab = {k.replace("</w>", ""): v for k, v in _vocab_and_merges()[0].items()}
  (gpt2 / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (gpt2 / "merges.txt").write_text("")
  with pytest.raises(ValueError, match=r"no vocabulary entry ends with '</w>'"):
    CLIPTokenizer.from_folder(str(gpt2))


def test_added_tokens_without_a_normalized_key_follow_the_added_token_default(tmp_path):
  """A tokenizer.json `added_tokens` entry without "normalized" is read as AddedToken's
  default (tokenizers: normalized = not special): a plain added token matches the
  lowercased text, a special one only its exact spelling. (tokenizers itself refuses such
  a file, "missing field `normalized`"; nothing pinned this default here.)"""
  symbols = list(bytes_to_unicode().values())
  vocab = {t: i for i, t in enumerate(symbols + [s + "</w>" for s in symbols] + [
      "<|startoftext|>", "<|endoftext|>", "<Cat-Toy>", "<Sp>"])}
  added = [{"id": vocab[t], "content": t, "special": special}
           for t, special in (("<Cat-Toy>", False), ("<Sp>", True))]
  (tmp_path / "tokenizer.json").write_text(json.dumps({
      "model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": vocab, "merges": []},
      "added_tokens": added}))
  tok = CLIPTokenizer.from_folder(str(tmp_path))
  assert tok.tokenize("a <CAT-toy>") == ["a</w>", "<Cat-Toy>"]
  assert tok.tokenize("<Sp>") == ["<Sp>"]
  assert "<Sp>" not in tok.tokenize("<sp>")


def test_special_token_spellings_in_a_prompt_match_transformers(tmp_path, hf_clip_tokenizer):
  """transformers' CLIP pre-tokenizer makes the literal "<|startoftext|>" /
  "<|endoftext|>" words of their own in the lowercased text ("<|ENDOFTEXT|>]" ended the
  word at "|>" there, not here), and SD folders (added_tokens_decoder) mark
  <|startoftext|> `normalized`, so "<|StartOfText|>" is BOS there (it was BPE'd here)."""
  folder = _write_slow_folder(tmp_path)
  vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
  config = json.loads((folder / "tokenizer_config.json").read_text())
  config["added_tokens_decoder"] = {
      str(vocab[t]): {"content": t, "lstrip": False, "normalized": normalized,
                      "rstrip": False, "single_word": False, "special": True}
      for t, normalized in (("<|startoftext|>", True), ("<|endoftext|>", False))}
  config.update(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                pad_token="<|endoftext|>", unk_token="<|endoftext|>")
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  texts = ["a <|StartOfText|> cat", "a <|ENDOFTEXT|>, cat", "!<|Endoftext|>]x",
           "<|endoftext|>] <|startoftext|>x"]
  ref, _ = _reference(hf_clip_tokenizer, folder, texts, max_length=24)
  ours = CLIPTokenizer.from_folder(str(folder))
  for text, a, b in zip(texts, ours(texts, max_length=24), ref):
    np.testing.assert_array_equal(a, b, err_msg=repr(text))
  assert ours(texts[0], max_length=8)[0, 2] == ours.bos_token_id


def test_dropped_is_the_end_that_truncation_cuts(tmp_path):
  # What the sampling commands' note names: the tokens past max_length - 2, decoded
  # (multi-byte characters span byte tokens).
  tok = CLIPTokenizer.from_folder(str(_write_slow_folder(tmp_path)))
  text = "a " * 80 + "Tōkyō 東京 😀 <|endoftext|>!"
  assert tok.dropped(text) == "a a a a a tōkyō 東京 😀 <|endoftext|> !"
  assert tok.dropped("a cat") == "" and tok.dropped("a cat", max_length=3) == "cat"
