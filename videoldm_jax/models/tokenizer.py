"""Pure-Python CLIP byte-level BPE tokenizer (no `tokenizers` / `transformers`).

Reproduces transformers' `CLIPTokenizer` as Stable Diffusion pipelines call it
(`padding="max_length", truncation=True`):

  1. special tokens (bos / eos / pad / unk) and added tokens (e.g. a textual-inversion
     `<cat-toy>`) written in the text are split out first and map straight to their
     ids, as transformers' added tokens do;
  2. every other chunk is NFC-normalised, whitespace runs collapse to one space and
     the text is lowercased (transformers' fast normaliser; ftfy and html.unescape are
     not used); added tokens marked `normalized` (special ones too, e.g. SD folders'
     <|startoftext|>) are split out of this text, matched by their content normalised
     the same way (as transformers does);
  3. CLIP's regex splits it into words, GPT-2's regex splits those again (transformers'
     ByteLevel pre-tokenizer: only a literal "<|endoftext|>" splits), each word is
     mapped byte -> printable unicode (GPT-2's table) and BPE-merged with `</w>` on its
     last symbol;
  4. ids are truncated to model_max_length - 2, wrapped in BOS ... EOS and padded.
"""

import json
import os
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import regex

from videoldm_jax.config_files import read_json_object
from videoldm_jax.models import config_base

DEFAULT_MAX_LENGTH = 77
_END_OF_WORD = "</w>"
# `\p{White_Space}` rather than `\s`: transformers' (Oniguruma) `\s` is exactly the
# Unicode White_Space set, Python's also matches \x1c-\x1f.
# The literal special tokens come first, as in transformers' CLIP pre-tokenizer: in the
# normalised text ("<|ENDOFTEXT|>" lowercased) they are words of their own.
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\p{White_Space}\p{L}\p{N}]+""")
# GPT-2's split, which transformers' ByteLevel pre-tokenizer (use_regex) runs on each
# CLIP word: it only splits those literal tokens ("<|", "endoftext", "|>").
_BYTE_LEVEL_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\p{White_Space}\p{L}\p{N}]+"""
    r"""|\p{White_Space}+(?!\S)|\p{White_Space}+""")
_WHITESPACE = regex.compile(r"\p{White_Space}+")
# tokenizer_config.json files without a limit carry transformers' "very large" sentinel.
_UNSET_MAX_LENGTH = 10 ** 6


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character table (256 entries)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def _normalize(text: str) -> str:
  """transformers' CLIP normaliser: NFC, whitespace runs -> one space, lowercase.

  Lowercased one character at a time, as its Lowercase normaliser does: str.lower()
  gives a word-final capital sigma its final form (ς), transformers gives σ.
  """
  return "".join(map(str.lower, _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))))


def _alternation(tokens: Iterable[str]) -> regex.Pattern:
  """A pattern splitting `tokens` out of a text (kept in `split`'s output), longest
  first so that a token holding another wins."""
  return regex.compile("(" + "|".join(regex.escape(t) for t in sorted(tokens, key=len,
                                                                        reverse=True)) + ")")


def _token_content(value: Any) -> str | None:
  """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


def _parse_merges(merges: Iterable[Any], source: str) -> list[tuple[str, str]]:
  out = []
  for i, m in enumerate(merges):
    pair = m.split(" ") if isinstance(m, str) else list(m)
    if len(pair) != 2:
      raise ValueError(f"{source}: merge #{i} {m!r} is not a pair of symbols")
    out.append((pair[0], pair[1]))
  return out


class CLIPTokenizer:
  """CLIP BPE tokenizer; `__call__(texts) -> (B, model_max_length) int32 ids`."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
               pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
               model_max_length: int = DEFAULT_MAX_LENGTH,
               added_tokens: Mapping[str, bool] | None = None):
    """Args: vocab {token: id}; merges in priority order; special tokens must be in
    vocab; added_tokens {token: normalized} (in vocab too) are split out of the text
    whole (where `normalized`, out of the normalised text); a special token listed there
    takes its flag, otherwise it is matched exactly."""
    self.encoder = dict(vocab)
    added_tokens = dict(added_tokens or {})
    for tok in added_tokens:
      if tok not in self.encoder:
        raise ValueError(f"added token {tok!r} is not in the vocabulary")
    self.bpe_ranks = {tuple(pair): i for i, pair in enumerate(merges)}
    for field, tok in (("bos_token", bos_token), ("eos_token", eos_token),
                       ("pad_token", pad_token), ("unk_token", unk_token)):
      if tok not in self.encoder:
        raise ValueError(f"{field} {tok!r} is not in the vocabulary")
    if model_max_length < 2:
      raise ValueError(f"model_max_length={model_max_length} leaves no room for BOS/EOS")
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token
    self.model_max_length = int(model_max_length)
    self.byte_encoder = bytes_to_unicode()
    # A special token marked `normalized` in added_tokens (SD folders' <|startoftext|>)
    # matches in the normalised text, as transformers does: "<|StartOfText|>" is BOS.
    exact = {t for t in (bos_token, eos_token, pad_token, unk_token)
             if not added_tokens.get(t, False)}
    exact |= {t for t, normalized in added_tokens.items() if not normalized}
    # Normalised added tokens are matched in the normalised text, by their normalised
    # content (transformers' AddedVocabulary): "<Cat-Toy>" matches "a  <cat-TOY>".
    self._normalized: dict[str, str] = {}  # normalised content -> token
    for t, normalized in added_tokens.items():
      if normalized and t not in exact:
        self._normalized.setdefault(_normalize(t), t)
    self._special_split = _alternation(exact) if exact else None
    self._normalized_split = (_alternation(self._normalized) if self._normalized
                              else None)
    self._specials = exact
    self._cache: dict[str, list[str]] = {}

  @property
  def bos_token_id(self) -> int:
    """Id of bos_token."""
    return self.encoder[self.bos_token]

  @property
  def eos_token_id(self) -> int:
    """Id of eos_token."""
    return self.encoder[self.eos_token]

  @property
  def pad_token_id(self) -> int:
    """Id of pad_token."""
    return self.encoder[self.pad_token]

  @property
  def unk_token_id(self) -> int:
    """Id of unk_token."""
    return self.encoder[self.unk_token]

  @classmethod
  def from_folder(cls, path: str) -> "CLIPTokenizer":
    """Loads a transformers tokenizer folder (e.g. a diffusers model's tokenizer/).

    Reads tokenizer.json (its BPE `model` section and `added_tokens`) when present,
    otherwise vocab.json + merges.txt; added tokens also from tokenizer_config.json's
    `added_tokens_decoder` and added_tokens.json (textual inversion). Special tokens
    and model_max_length come from tokenizer_config.json, where special_tokens_map.json
    overrides them unless the config has `added_tokens_decoder` (transformers' order;
    SD 2.x folders pad with "!" from the map, the config saying <|endoftext|>), then
    CLIP's defaults (pad = <|endoftext|> as SD 1.x; max length 77).

    Raises:
      FileNotFoundError: naming the folder and the expected files.
      ValueError: naming the file, for one that is not JSON (or UTF-8 text) of the
        expected layout, and for a tokenizer that is not a BPE with `</w>` word ends.
    """
    if not os.path.isdir(path):
      raise FileNotFoundError(f"tokenizer folder {path!r} " + (
          "is not a folder" if os.path.exists(path) else "does not exist"))
    files = set(os.listdir(path))
    added: dict[str, tuple[int, bool]] = {}  # content -> (id, normalized)
    if "tokenizer.json" in files:
      vocab, merges, added = cls._load_tokenizer_json(os.path.join(path, "tokenizer.json"))
    elif {"vocab.json", "merges.txt"} <= files:
      vocab = read_json_object(os.path.join(path, "vocab.json"))
      merges_path = os.path.join(path, "merges.txt")
      try:
        with open(merges_path, encoding="utf-8") as f:
          lines = [ln for ln in f.read().split("\n")
                   if ln.strip() and not ln.startswith("#version")]
      except UnicodeDecodeError as e:
        raise ValueError(f"{merges_path}: not UTF-8 text ({e})") from e
      merges = _parse_merges(lines, merges_path)
    else:
      raise FileNotFoundError(
          f"tokenizer folder {path!r} has neither tokenizer.json nor vocab.json + "
          f"merges.txt (found: {sorted(files)})")
    settings: dict[str, Any] = {}
    if "tokenizer_config.json" in files:
      settings = {k: v for k, v in
                  read_json_object(os.path.join(path, "tokenizer_config.json")).items()
                  if v is not None}
    decoder = settings.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
      for idx, tok in decoder.items():
        content = _token_content(tok)
        special = bool(tok.get("special", False)) if isinstance(tok, Mapping) else False
        normalized = (tok.get("normalized", not special) if isinstance(tok, Mapping)
                      else True)
        added.setdefault(content, (int(idx), bool(normalized)))
    elif "special_tokens_map.json" in files:
      settings.update({k: v for k, v in
                       read_json_object(os.path.join(path, "special_tokens_map.json")).items()
                       if v is not None})
    if "added_tokens.json" in files:  # {content: id}, written by slow tokenizers
      for content, idx in read_json_object(os.path.join(path, "added_tokens.json")).items():
        added.setdefault(content, (int(idx), True))
    vocab = dict(vocab)
    for content, (idx, _) in added.items():
      vocab[content] = idx
    kwargs: dict[str, Any] = {}
    fields = ("bos_token", "eos_token", "pad_token", "unk_token")
    for field in fields:
      content = _token_content(settings.get(field))
      if content is not None:
        kwargs[field] = content
    for field in fields:
      value = settings.get(field)
      content = _token_content(value)
      if (isinstance(value, Mapping) and "normalized" in value and content in vocab
          and content not in added and list(kwargs.values()).count(content) == 1):
        # An AddedToken dict of older SD folders' special_tokens_map.json ("normalized":
        # true for <|startoftext|>): its flag, as transformers reads it. (Where eos, pad
        # and unk share one token transformers' pick among their flags is its own; such
        # a token stays an exact match, as transformers has it for SD 1.x's files.)
        added[content] = (vocab[content], bool(value["normalized"]))
    max_len = settings.get("model_max_length")
    if isinstance(max_len, float) and max_len.is_integer():
      max_len = int(max_len)  # (77.0, or 1e+30 for "no limit", in some files)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)):
      raise ValueError(f"{os.path.join(path, 'tokenizer_config.json')}: model_max_length="
                       f"{max_len!r}, expected an integer")
    if max_len is not None and max_len < _UNSET_MAX_LENGTH:
      kwargs["model_max_length"] = int(max_len)
    specials = {kwargs.get(f, d) for f, d in (
        ("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"),
        ("pad_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"))}
    # Special tokens keep their `normalized` flag (transformers matches a normalized
    # <|startoftext|> in the lowercased text); those without an entry match exactly.
    kwargs["added_tokens"] = {t: normalized for t, (_, normalized) in added.items()
                              if t not in specials or normalized}
    bad = next(((k, v) for k, v in vocab.items()
                if isinstance(v, bool) or not isinstance(v, int)), None)
    if bad is not None:
      raise ValueError(f"tokenizer folder {path!r}: vocabulary entry {bad[0]!r} has id "
                       f"{bad[1]!r}, expected an integer")
    # CLIP's BPE marks word ends with `</w>` ("a</w>"); a GPT-2 / RoBERTa vocabulary
    # (word starts marked with "Ġ") loads but turns most words into unk.
    if not any(k.endswith(_END_OF_WORD) for k in vocab):
      raise ValueError(f"tokenizer folder {path!r}: no vocabulary entry ends with "
                       f"{_END_OF_WORD!r}; not a CLIP tokenizer")
    try:
      return cls(vocab, merges, **kwargs)
    except ValueError as e:
      raise ValueError(f"tokenizer folder {path!r}: {e}") from e

  @staticmethod
  def _load_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]],
                                               dict[str, tuple[int, bool]]]:
    data = read_json_object(path)
    model = data.get("model") or {}
    if (not isinstance(model, Mapping) or model.get("type", "BPE") != "BPE"
        or not isinstance(model.get("vocab"), Mapping)
        or not isinstance(model.get("merges"), list)):
      kind = model.get("type") if isinstance(model, Mapping) else type(model).__name__
      raise ValueError(f"{path}: expected a BPE `model` section with a `vocab` object and "
                       f"a `merges` list (got {kind!r})")
    suffix = model.get("end_of_word_suffix")
    if suffix != _END_OF_WORD:
      raise ValueError(f"{path}: model.end_of_word_suffix={suffix!r}, CLIP uses "
                       f"{_END_OF_WORD!r}")
    added = {}
    for i, tok in enumerate(data.get("added_tokens") or []):
      if (not isinstance(tok, Mapping) or not isinstance(tok.get("content"), str)
          or not config_base.is_integer(tok.get("id"), 0)):
        raise ValueError(f"{path}: added_tokens[{i}]={tok!r}: expected an object with a "
                         "string `content` and an integer `id` >= 0")
      # Without `normalized`, AddedToken's own default (not special), as for
      # added_tokens_decoder above; tokenizers itself refuses such an entry.
      added[tok["content"]] = (int(tok["id"]),
                               bool(tok.get("normalized", not tok.get("special", False))))
    return dict(model["vocab"]), _parse_merges(model["merges"], path), added

  def _bpe(self, word: str) -> list[str]:
    """BPE symbols of one byte-mapped word, the last carrying `</w>`."""
    if word in self._cache:
      return self._cache[word]
    symbols = list(word[:-1]) + [word[-1] + _END_OF_WORD]
    while len(symbols) > 1:
      pairs = {(a, b) for a, b in zip(symbols[:-1], symbols[1:])}
      best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
      if best not in self.bpe_ranks:
        break
      merged, i = [], 0
      # Left-to-right, non-overlapping: "a a a" with merge (a, a) gives "aa a".
      while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
          merged.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    if len(self._cache) < 100_000:
      self._cache[word] = symbols
    return symbols

  def tokenize(self, text: str) -> list[str]:
    """Text -> BPE token strings (special tokens included verbatim, no BOS/EOS added)."""
    tokens = []
    for chunk in (self._special_split.split(text) if self._special_split else (text,)):
      if chunk in self._specials:
        tokens.append(chunk)
        continue
      chunk = _normalize(chunk)
      for piece in (self._normalized_split.split(chunk) if self._normalized_split
                    else (chunk,)):
        if piece in self._normalized:
          tokens.append(self._normalized[piece])
          continue
        for word in _CLIP_PATTERN.findall(piece):
          for sub in _BYTE_LEVEL_PATTERN.findall(word):
            tokens += self._bpe("".join(self.byte_encoder[b] for b in sub.encode("utf-8")))
    return tokens

  def encode(self, text: str) -> list[int]:
    """Text -> ids without BOS/EOS; symbols missing from the vocab become unk."""
    unk = self.unk_token_id
    return [self.encoder.get(t, unk) for t in self.tokenize(text)]

  def dropped(self, text: str, max_length: int | None = None) -> str:
    """The end of `text` that `__call__` cuts off (its tokens past max_length - 2), as
    the text encoder would have read it: lowercased, words joined by single spaces;
    '' when the text fits. max_length defaults to model_max_length."""
    length = self.model_max_length if max_length is None else int(max_length)
    whole = self._specials | set(self._normalized.values())
    byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    out, pending = [], bytearray()
    for tok in self.tokenize(text)[max(length - 2, 0):]:
      if tok in whole or any(c not in byte_decoder for c in tok):
        out += [pending.decode("utf-8", "replace"), tok + _END_OF_WORD]
        pending = bytearray()
      else:  # (a character's bytes may span tokens)
        pending += bytes(byte_decoder[c] for c in tok)
    out.append(pending.decode("utf-8", "replace"))
    return " ".join("".join(out).replace(_END_OF_WORD, " ").split())

  def __call__(self, texts: Sequence[str] | str, max_length: int | None = None) -> np.ndarray:
    """Batch of texts -> (B, max_length) int32 ids: BOS, ids[:max_length-2], EOS, pad.

    max_length defaults to model_max_length (77 for CLIP).
    """
    if isinstance(texts, str):
      texts = [texts]
    length = self.model_max_length if max_length is None else int(max_length)
    if length < 2:
      raise ValueError(f"max_length={length} leaves no room for BOS/EOS")
    out = np.full((len(texts), length), self.pad_token_id, dtype=np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_token_id] + self.encode(text)[:length - 2] + [self.eos_token_id]
      out[row, :len(ids)] = ids
    return out


def write_byte_level_tokenizer(folder: str) -> None:
  """Writes a merge-free CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json;
  514 tokens) to `folder`.

  CLIP's vocabulary starts with the 256 byte symbols and their `</w>` forms and ends
  with the two special tokens; with no merges every character is one token. Used by
  randomly initialised models (demo, tests) that need a real tokenizer folder but no
  downloaded vocabulary.
  """
  os.makedirs(folder, exist_ok=True)
  symbols = list(bytes_to_unicode().values())
  vocab = symbols + [s + _END_OF_WORD for s in symbols] + ["<|startoftext|>",
                                                            "<|endoftext|>"]
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"model_max_length": 77, "bos_token": "<|startoftext|>",
               "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}, f)
