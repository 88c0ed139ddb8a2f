"""SOLAR's threshold on synthetic scores where the answer is known (the ladder's first rung).

  python -m experiments.solar_thresholds --out=/tmp/solar_thresholds.md

Each synthetic batch mimics the embedded world's proportions: per modality a fraction ``base`` of
the units of a positive pair are intersection units, scored N(separation, 1); the other units of
the pair (the difference) score N(shift, 1); every unit scored against another sample's partner
(the in-batch negatives) scores N(0, 1). A shift above 0 stands for contextual features, whose
difference units lean towards their own partner. Both estimators of ``masks.fit_masks`` fit a threshold:
'pairs' (the paper's: one Gaussian per set of pairs) and 'mixture' (the intersection component
inside the positive pairs). The table gives, per estimator, the predicted fraction, precision and
recall of "score > threshold" against the known intersection, averaged over ``--trials`` batches,
and the best precision/recall any threshold reaches (the Bayes rule with known parameters).
"""

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mmret.recipes.solar import masks as masks_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Markdown file to write (printed either way).")
flags.DEFINE_integer("trials", 5, "Synthetic batches per row.")
flags.DEFINE_integer("pairs", 32, "Pairs per batch (the recipe's batch size).")

# (modality, intersection fraction among a pair's units, units per sample): the world's rates.
MODALITIES = (("text", 0.34, 24), ("patch", 0.115, 16))
SEPARATIONS = (1.0, 2.0, 3.0)
SHIFTS = (0.0, 0.5, 1.0)


def synthetic_scores(rng, base, units, pairs, separation, shift):
  """(positive [pairs,units], truth [pairs,units], negative [pairs,units,pairs-1]) scores."""
  truth = rng.random((pairs, units)) < base
  positive = np.where(
      truth, rng.normal(separation, 1.0, truth.shape), rng.normal(shift, 1.0, truth.shape)
  )
  negative = rng.normal(0.0, 1.0, (pairs, units, pairs - 1))
  return positive.astype(np.float32), truth, negative.astype(np.float32)


def quality(predicted, truth):
  hit = np.sum(predicted & truth)
  return (
      100.0 * predicted.mean(),
      100.0 * hit / max(predicted.sum(), 1),
      100.0 * hit / max(truth.sum(), 1),
  )


def bayes_threshold(base, separation, shift):
  """Posterior-1/2 threshold of base N(separation,1) vs (1-base) N(shift,1)."""
  if separation <= shift:
    return np.inf
  return 0.5 * (separation + shift) + np.log((1 - base) / base) / (separation - shift)


def rows(trials, pairs):
  out = []
  for modality, base, units in MODALITIES:
    for separation in SEPARATIONS:
      for shift in SHIFTS:
        sums = {k: np.zeros(3) for k in ("pairs", "mixture", "bayes")}
        for trial in range(trials):
          rng = np.random.default_rng(1000 * trial + int(10 * separation + shift * 100))
          positive, truth, negative = synthetic_scores(rng, base, units, pairs, separation, shift)
          for estimator in ("pairs", "mixture"):
            fit = (
                masks_lib.fit_threshold if estimator == "pairs" else masks_lib.fit_mixture_threshold
            )
            threshold = fit(jnp.asarray(positive), jnp.asarray(negative))
            threshold = threshold if estimator == "pairs" else threshold[0]
            sums[estimator] += quality(positive > float(threshold), truth)
          sums["bayes"] += quality(positive > bayes_threshold(base, separation, shift), truth)
        out.append((modality, base, separation, shift, {k: v / trials for k, v in sums.items()}))
  return out


def markdown(results) -> str:
  header = (
      "| units | base % | separation | difference shift | pairs: pred / prec / rec "
      "| mixture: pred / prec / rec | Bayes: pred / prec / rec |\n|---|---|---|---|---|---|---|\n"
  )
  cell = lambda v: " / ".join(f"{x:.1f}" for x in v)
  lines = [
      f"| {m} | {100 * b:.1f} | {sep:.0f} σ | {shift:.1f} σ | {cell(r['pairs'])} "
      f"| {cell(r['mixture'])} | {cell(r['bayes'])} |"
      for m, b, sep, shift, r in results
  ]
  return header + "\n".join(lines) + "\n"


def main(argv):
  del argv
  text = markdown(rows(FLAGS.trials, FLAGS.pairs))
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
