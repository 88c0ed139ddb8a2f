"""Text tokenizers: word-level, CLIP byte-level BPE and BERT WordPiece.

Every tokenizer frames a text as ``[start] pieces [end]``, truncates long texts keeping the end
token (as OpenAI CLIP and BERT do) and pads to a fixed length, so batches have static shapes:

  ids, mask = tokenizer.encode(texts, max_len)             # int32 [N,L], bool [N,L]
  ids, mask, tags = tokenizer.encode_with_word_tags(text, word_tags, max_len)

The word-aligned variant maps one tag per whitespace-separated word of ``text`` onto every
token of that word (special and pad tokens get tag 0); the tokenizers here never let a token
span two whitespace-separated words, so both variants give the same ids.

Specs understood by :func:`get_tokenizer`:
  ``'dataset'``          word vocabulary stored in the training dataset's metadata
                         (``metadata['vocab']``: the embedded world's words, or those of an
                         import's training captions); ``'world'`` is the same
  ``'word:PATH'``        word vocabulary file, one token per line (see :func:`save_word_vocab`)
  ``'bpe:PATH'``         CLIP's ``bpe_simple_vocab_16e6.txt.gz``
  ``'wordpiece:PATH'``   BERT's ``vocab.txt``
"""

from __future__ import annotations

import abc
import collections
import functools
import gzip
import html
import os
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from mmret import faults

__all__ = [
    "Tokenizer",
    "WordTokenizer",
    "ClipBpeTokenizer",
    "WordPieceTokenizer",
    "build_word_vocab",
    "save_word_vocab",
    "load_word_vocab",
    "get_tokenizer",
]

# Distinct words whose ids a tokenizer memoises for encode_with_word_tags (a vocabulary's worth).
WORD_CACHE_SIZE = 1 << 17


class Tokenizer(abc.ABC):
  """Base class: subclasses define the pieces of a text; framing and padding live here."""

  vocab_size: int
  pad_id: int
  start_id: int
  end_id: int

  @abc.abstractmethod
  def text_ids(self, text: str) -> list[int]:
    """Ids of ``text`` without start/end tokens."""

  def word_ids(self, word: str) -> list[int]:
    """Ids of one whitespace-separated word (no start/end tokens)."""
    return self.text_ids(word)

  def _frame(self, body: Sequence[int], max_len: int) -> list[int]:
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 to hold the start and end tokens, got {max_len}")
    # Truncate the body, never the end token: the models pool at (or attend up to) it.
    return [self.start_id, *body[: max_len - 2], self.end_id]

  def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ids int32 [N, max_len] and mask bool [N, max_len] (True = real token)."""
    if isinstance(texts, str):
      raise TypeError("encode expects a list of texts, got a single str")
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    for row, text in enumerate(texts):
      framed = self._frame(self.text_ids(text), max_len)
      ids[row, : len(framed)] = framed
      mask[row, : len(framed)] = True
    return ids, mask

  def encode_with_word_tags(
      self, text: str, word_tags: Sequence[int], max_len: int
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encodes one text; returns ids int32 [L], mask bool [L] and per-token tags int32 [L]."""
    words = text.split()
    word_tags = np.asarray(word_tags).reshape(-1)
    if len(words) != len(word_tags):
      raise ValueError(
          f"{len(word_tags)} word tags for {len(words)} whitespace-separated "
          f"words in text {text[:80]!r}"
      )
    pieces = [self._cached_word_ids(word) for word in words]
    framed = self._frame([i for word_pieces in pieces for i in word_pieces], max_len)
    body_tags = np.repeat(word_tags, [len(word_pieces) for word_pieces in pieces])
    ids = np.full((max_len,), self.pad_id, np.int32)
    mask = np.zeros((max_len,), bool)
    token_tags = np.zeros((max_len,), np.int32)
    ids[: len(framed)] = framed
    mask[: len(framed)] = True
    token_tags[1 : len(framed) - 1] = body_tags[: len(framed) - 2]
    return ids, mask, token_tags

  def _cached_word_ids(self, word: str) -> tuple[int, ...]:
    """:meth:`word_ids` of ``word``, memoised for the first ``WORD_CACHE_SIZE`` distinct words."""
    cache = self.__dict__.setdefault("_word_ids_cache", {})
    ids = cache.get(word)
    if ids is None:
      ids = tuple(self.word_ids(word))
      if len(cache) < WORD_CACHE_SIZE:
        cache[word] = ids
    return ids


# ----------------------------------------------------------------------------------------------
# Word level.

WORD_SPECIALS = ("<pad>", "<unk>", "<start>", "<end>")
# A word is split into runs of letters/digits and single punctuation marks ("red," -> red ,).
_WORD_PIECE_RE = re.compile(r"\w+|[^\w\s]")


def split_words(text: str, lowercase: bool = True) -> list[str]:
  """Word-level tokens of ``text``: letter/digit runs and single punctuation marks."""
  return _WORD_PIECE_RE.findall(text.lower() if lowercase else text)


def build_word_vocab(
    texts: Iterable[str], *, min_count: int = 1, max_size: int | None = None, lowercase: bool = True
) -> list[str]:
  """Word vocabulary of a corpus: specials first, then tokens by decreasing count (ties: a-z)."""
  counts = collections.Counter()
  for text in texts:
    counts.update(split_words(text, lowercase))
  words = sorted(
      (w for w, c in counts.items() if c >= min_count and w not in WORD_SPECIALS),
      key=lambda w: (-counts[w], w),
  )
  if max_size is not None:
    words = words[: max(0, max_size - len(WORD_SPECIALS))]
  return [*WORD_SPECIALS, *words]


def save_word_vocab(vocab: Sequence[str], path: str) -> None:
  """Writes one token per line (the format read by ``'word:PATH'``)."""
  for token in vocab:
    if not token or any(c.isspace() for c in token):
      raise ValueError(f"vocabulary token {token!r} is empty or contains whitespace")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")


def load_word_vocab(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.rstrip("\n")]


class WordTokenizer(Tokenizer):
  """One id per word-level token; unknown tokens map to ``<unk>``.

  The vocabulary is laid out as the specials ``<pad> <unk> <start> <end>`` (ids 0-3) followed by
  the given tokens in order, so a list with or without the specials gives the same layout.
  ``lowercase=None`` lower-cases texts exactly when every vocabulary token is lower case.
  """

  def __init__(self, vocab: Sequence[str], *, lowercase: bool | None = None):
    # By default lower-case the text exactly when the vocabulary itself is all lower case.
    if lowercase is None:
      lowercase = all(t == t.lower() for t in vocab)
    tokens = [*WORD_SPECIALS, *(t for t in vocab if t not in WORD_SPECIALS)]
    self.id_of = {}
    for token in tokens:
      if token in self.id_of:
        raise ValueError(f"duplicate vocabulary token {token!r}")
      self.id_of[token] = len(self.id_of)
    self.tokens = tokens
    self.lowercase = lowercase
    self.vocab_size = len(tokens)
    self.pad_id, self.unk_id, self.start_id, self.end_id = range(4)

  def text_ids(self, text: str) -> list[int]:
    return [self.id_of.get(t, self.unk_id) for t in split_words(text, self.lowercase)]


# ----------------------------------------------------------------------------------------------
# CLIP byte-level BPE (OpenAI's algorithm).

# OpenAI keeps the first 48,894 merges: 512 byte tokens + merges + 2 specials = 49,408 ids.
CLIP_NUM_MERGES = 49152 - 256 - 2
_CLIP_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP map from bytes to printable characters (so BPE never sees raw control bytes)."""
  printable = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


def _is_letter(c: str) -> bool:
  return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:
  return unicodedata.category(c)[0] == "N"


def clip_pretokenize(text: str) -> list[str]:
  r"""Splits cleaned text as CLIP's pattern does.

  Pattern: ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
  [^\s\p{L}\p{N}]+``; written as a scanner so that only the standard library is needed.
  """
  pieces, i, n = [], 0, len(text)
  while i < n:
    c = text[i]
    if c.isspace():
      i += 1
      continue
    match = next((s for s in _CLIP_SPECIALS + _CLIP_CONTRACTIONS if text.startswith(s, i)), None)
    if match is not None:
      j = i + len(match)
    elif _is_letter(c):
      j = i + 1
      while j < n and _is_letter(text[j]):
        j += 1
    elif _is_number(c):
      j = i + 1
    else:
      j = i + 1
      while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
        j += 1
    pieces.append(text[i:j])
    i = j
  return pieces


def clip_clean(text: str) -> str:
  """CLIP's basic cleaning without ftfy: HTML unescape, NFC, collapse whitespace, lower-case."""
  text = html.unescape(html.unescape(text))
  text = unicodedata.normalize("NFC", text)
  return " ".join(text.split()).lower()


class ClipBpeTokenizer(Tokenizer):
  """OpenAI CLIP's tokenizer. Pads with id 0, as OpenAI's and open_clip's ``tokenize`` do."""

  def __init__(self, bpe_path: str, *, num_merges: int = CLIP_NUM_MERGES, pad_id: int = 0):
    opener = gzip.open if bpe_path.endswith(".gz") else open
    with opener(bpe_path, "rb") as f:
      lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : num_merges + 1] if line.strip()]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
      raise ValueError(f'{bpe_path}: merge line {" ".join(bad)!r} is not a pair of symbols')
    self.byte_encoder = bytes_to_unicode()
    base = list(self.byte_encoder.values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + list(_CLIP_SPECIALS)
    self.encoder = {t: i for i, t in enumerate(tokens)}
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.vocab_size = len(tokens)
    self.start_id = self.encoder["<|startoftext|>"]
    self.end_id = self.encoder["<|endoftext|>"]
    self.pad_id = pad_id
    self._cache = {s: s for s in _CLIP_SPECIALS}

  def bpe(self, token: str) -> str:
    """Space-separated BPE symbols of one pre-token (already byte-encoded)."""
    if token in self._cache:
      return self._cache[token]
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = set(zip(word[:-1], word[1:]))
      bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
      if bigram not in self.bpe_ranks:
        break
      first, second = bigram
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    result = " ".join(word)
    self._cache[token] = result
    return result

  def text_ids(self, text: str) -> list[int]:
    ids = []
    for piece in clip_pretokenize(clip_clean(text)):
      encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      # Symbols outside a custom vocabulary fall back to <|endoftext|>, the reference's unk.
      ids.extend(self.encoder.get(s, self.end_id) for s in self.bpe(encoded).split(" "))
    return ids


# ----------------------------------------------------------------------------------------------
# BERT WordPiece.


def _is_bert_whitespace(c: str) -> bool:
  return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_bert_control(c: str) -> bool:
  return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_bert_punctuation(c: str) -> bool:
  cp = ord(c)
  # BERT treats every non-alphanumeric ASCII character as punctuation ("$", "^", "`").
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(c).startswith("P")


def _is_cjk(cp: int) -> bool:
  return any(
      lo <= cp <= hi
      for lo, hi in (
          (0x4E00, 0x9FFF),
          (0x3400, 0x4DBF),
          (0x20000, 0x2A6DF),
          (0x2A700, 0x2B73F),
          (0x2B740, 0x2B81F),
          (0x2B820, 0x2CEAF),
          (0xF900, 0xFAFF),
          (0x2F800, 0x2FA1F),
      )
  )


class WordPieceTokenizer(Tokenizer):
  """BERT's uncased tokenizer: basic tokenization, then greedy longest-match-first WordPiece."""

  def __init__(self, vocab_path: str, *, lowercase: bool = True, max_chars_per_word: int = 100):
    with open(vocab_path, encoding="utf-8") as f:
      tokens = [line.rstrip("\n") for line in f]
    while tokens and not tokens[-1]:
      tokens.pop()
    self.vocab = {t: i for i, t in enumerate(tokens)}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
    if missing:
      raise ValueError(f"{vocab_path}: vocabulary lacks the special tokens {missing}")
    self.lowercase = lowercase
    self.max_chars_per_word = max_chars_per_word
    self.vocab_size = len(tokens)
    self.pad_id = self.vocab["[PAD]"]
    self.unk_id = self.vocab["[UNK]"]
    self.start_id = self.vocab["[CLS]"]
    self.end_id = self.vocab["[SEP]"]

  def basic_tokens(self, text: str) -> list[str]:
    chars = []
    for c in text:
      cp = ord(c)
      if cp == 0 or cp == 0xFFFD or _is_bert_control(c):
        continue
      if _is_bert_whitespace(c):
        chars.append(" ")
      elif _is_cjk(cp):
        chars.extend((" ", c, " "))  # every CJK character is its own word
      else:
        chars.append(c)
    text = unicodedata.normalize("NFC", "".join(chars))
    tokens = []
    for word in text.split():
      if self.lowercase:
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(c for c in word if unicodedata.category(c) != "Mn")
      current = ""
      for c in word:
        if _is_bert_punctuation(c):
          if current:
            tokens.append(current)
          tokens.append(c)
          current = ""
        else:
          current += c
      if current:
        tokens.append(current)
    return tokens

  def wordpiece(self, token: str) -> list[int]:
    if len(token) > self.max_chars_per_word:
      return [self.unk_id]
    ids, start = [], 0
    while start < len(token):
      end = len(token)
      while end > start:
        piece = token[start:end] if start == 0 else "##" + token[start:end]
        if piece in self.vocab:
          ids.append(self.vocab[piece])
          break
        end -= 1
      if end == start:
        return [self.unk_id]  # any unmatched remainder makes the whole word unknown
      start = end
    return ids

  def text_ids(self, text: str) -> list[int]:
    return [i for token in self.basic_tokens(text) for i in self.wordpiece(token)]


# ----------------------------------------------------------------------------------------------


# Specs of the word vocabulary stored in a dataset's metadata.
DATASET_SPECS = ("dataset", "world")


def fingerprint(spec: str) -> str:
  """``spec`` with its vocabulary file replaced by the file's sha256: what a cache keyed on the
  tokenizer must hold (the same vocabulary at another path is the same tokenizer; an edited file
  at the same path is not). Specs without a file (the dataset's vocabulary) are returned as is."""
  kind, _, path = spec.partition(":")
  path = os.path.expanduser(path)
  if not path or not os.path.isfile(path):
    return spec
  _, sha256 = faults.size_and_sha256(path)
  return f"{kind}:sha256={sha256}"


def get_tokenizer(
    spec: str, *, dataset: str | None = None, data_dir: str | None = None
) -> Tokenizer:
  """Builds the tokenizer named by ``spec`` (see the module docstring)."""
  kind, _, path = spec.partition(":")
  if kind in DATASET_SPECS and not path:
    if dataset is None:
      raise ValueError(f"tokenizer {spec!r} needs the dataset whose metadata holds the vocabulary")
    from mmret.data import sources  # pylint: disable=import-outside-toplevel

    metadata = sources.dataset_metadata(dataset, data_dir)
    if "vocab" not in metadata:
      raise ValueError(
          f"tokenizer {spec!r}: dataset {dataset!r} has no word vocabulary in its metadata "
          f"(keys: {sorted(metadata)}); a dataset imported before mmret.prepare stored one needs "
          "importing again (python -m mmret.prepare ... --overwrite), or pass a tokenizer that "
          "covers its captions: --config.input.tokenizer=word:PATH (one word per line, "
          "tokenizers.save_word_vocab), bpe:PATH or wordpiece:PATH"
      )
    return WordTokenizer(list(metadata["vocab"]))
  builders = {
      "word": lambda p: WordTokenizer(load_word_vocab(p)),
      "bpe": ClipBpeTokenizer,
      "wordpiece": WordPieceTokenizer,
  }
  if kind not in builders or not path:
    raise ValueError(
        f"unknown tokenizer spec {spec!r}; expected dataset (or world), word:PATH, bpe:PATH "
        "or wordpiece:PATH"
    )
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer {spec!r}: no file at {path}")
  return builders[kind](path)
