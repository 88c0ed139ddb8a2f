"""The word-identity bound of the SOLAR ladder (experiments/solar_vocabulary.py) on hand-made
captions whose AUCs are worked out by hand."""

import pytest

from experiments import solar_vocabulary


def test_word_identity_auc_by_hand():
  train = [("red", 1)] * 3 + [("red", 0), ("the", 0), ("the", 0), ("monday", 2), ("big", 1)]
  # Scores: red 3/4, big 1, the 0, monday 0; the unseen 'new' and 'blue' the overall rate 4/8.
  held_out = [("red", 1), ("big", 1), ("blue", 1), ("the", 0), ("monday", 2), ("red", 0)]
  held_out.append(("new", 2))
  result = solar_vocabulary.word_identity_auc(train, held_out)
  # Intersection {0.75, 1, 0.5} against {0, 0, 0.75, 0.5}: 3.5 + 4 + 2.5 of 12 pairs (ties half).
  assert result["auc"] == pytest.approx(100 * 10 / 12)
  # Against the text-only words {0, 0.5}: 2 + 2 + 1.5 of 6 pairs.
  assert result["auc_vs_difference"] == pytest.approx(100 * 5.5 / 6)


def test_tagged_words_and_vocabulary():
  records = [
      {"caption": "a red cube on monday", "caption_tags": [0, 1, 1, 0, 2]},
      {"caption": b"the red ball", "caption_tags": [[0, 1, 1]]},
  ]
  words = solar_vocabulary.tagged_words(records)
  assert words == [
      ("a", 0), ("red", 1), ("cube", 1), ("on", 0), ("monday", 2), ("the", 0), ("red", 1),
      ("ball", 1),
  ]  # fmt: skip
  counts = solar_vocabulary.vocabulary_by_kind(words)
  assert counts["intersection"] == {"red": 2, "cube": 1, "ball": 1}
  assert counts["text_only"] == {"monday": 1}
  with pytest.raises(ValueError, match="'x': 2 words but 3 caption_tags"):
    solar_vocabulary.tagged_words([{"id": "x", "caption": "a b", "caption_tags": [0, 1, 1]}])
