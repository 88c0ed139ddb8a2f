"""What the caption words alone tell about the intersection (the SOLAR ladder's rung 9).

  python -m experiments.solar_vocabulary --world=tiny

Counts the embedded world's caption words by ground-truth kind (template, intersection,
text-only) on the training split, the words the kinds share, and the AUC a score that knows
only the word reaches on the held-out pairs (split ``val``): each word scores its training
rate of being tagged intersection (a word never seen in training scores the overall rate).
The AUC is taken as in the mask evaluator: intersection words against all other words, and
against the text-only words alone. A text mask that reaches that AUC needs no context at all;
the learned token scores are compared with it in README's ladder.
"""

import collections

import numpy as np
from absl import app, flags

from mmret.data import pipeline, sources
from mmret.recipes.solar import evaluator, masks

FLAGS = flags.FLAGS
flags.DEFINE_string("world", "tiny", "Embedded world size.")
flags.DEFINE_string("data_dir", None, "Dataset directory (default: the input config's).")

KINDS = evaluator.TEXT_KINDS  # indexed by the caption tag: template, intersection, text-only


def tagged_words(records):
  """[(word, tag)] over the records' captions (``caption`` split on spaces, ``caption_tags``)."""
  out = []
  for record in records:
    words = evaluator._text(record["caption"]).split()  # pylint: disable=protected-access
    tags = np.asarray(record["caption_tags"]).reshape(-1).tolist()
    if len(words) != len(tags):
      raise ValueError(
          f"record {record.get('id', '?')!r}: {len(words)} words but {len(tags)} caption_tags"
      )
    out.extend(zip(words, (int(t) for t in tags)))
  return out


def vocabulary_by_kind(words) -> dict:
  """{kind: Counter of its words}."""
  counts = {kind: collections.Counter() for kind in KINDS}
  for word, tag in words:
    counts[KINDS[tag]][word] += 1
  return counts


def word_identity_auc(train_words, test_words) -> dict:
  """AUCs (percent) of the word-only score on ``test_words``: intersection against all other
  words and against the text-only words."""
  seen, hits = collections.Counter(), collections.Counter()
  for word, tag in train_words:
    seen[word] += 1
    hits[word] += tag == masks.INTERSECTION_LABEL
  overall = sum(hits.values()) / max(sum(seen.values()), 1)
  scores = np.array([hits[w] / seen[w] if seen[w] else overall for w, _ in test_words])
  tags = np.array([t for _, t in test_words])
  inter = scores[tags == masks.INTERSECTION_LABEL]
  return {
      "auc": 100 * evaluator.auc(inter, scores[tags != masks.INTERSECTION_LABEL]),
      "auc_vs_difference": 100 * evaluator.auc(inter, scores[tags == evaluator.DIFFERENCE_KIND]),
  }


def main(argv):
  del argv
  data_dir = FLAGS.data_dir or pipeline.default_input_config().data_dir
  dataset = f"mmret_world/{FLAGS.world}"
  train = tagged_words(sources.open_split(dataset, "train", data_dir))
  held_out = tagged_words(sources.open_split(dataset, "val", data_dir))
  counts = vocabulary_by_kind(train)
  print(f"{dataset}, split train: caption words by kind")
  print("| kind | words | distinct | most frequent |")
  print("|---|---|---|---|")
  for kind in KINDS:
    frequent = ", ".join(w for w, _ in counts[kind].most_common(8))
    print(f"| {kind} | {sum(counts[kind].values())} | {len(counts[kind])} | {frequent} |")
  for a, b in (
      ("intersection", "text_only"),
      ("template", "intersection"),
      ("template", "text_only"),
  ):
    shared = sorted(set(counts[a]) & set(counts[b]))
    print(f"distinct words tagged both {a} and {b}: {len(shared)} {shared[:10]}")
  result = word_identity_auc(train, held_out)
  print(
      f"word-identity score on split val: text AUC {result['auc']:.1f}, "
      f"against the text-only words {result['auc_vs_difference']:.1f}"
  )


if __name__ == "__main__":
  app.run(main)
