"""Retrieval metrics against plain brute-force definitions on small hand-made cases."""

import numpy as np
import pytest

from mmret.evals import metrics


def _brute_recall(scores, positives, k):
  """Recall@k by definition: a hit if a positive has fewer than k candidates ranked above it,
  where 'above' = higher score, or equal score and lower index."""
  hits = []
  for row, pos in zip(np.asarray(scores), positives):
    best = min(int(np.sum(row > row[p]) + np.sum(row[:p] == row[p])) for p in pos)
    hits.append(best < k)
  return 100.0 * np.mean(hits)


def test_rank_from_scores_breaks_ties_by_candidate_order():
  scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]])
  np.testing.assert_array_equal(metrics.rank_from_scores(scores), [[1, 3, 0, 2, 4]])
  np.testing.assert_array_equal(metrics.rank_from_scores(scores, 2), [[1, 3]])


def test_first_positive_rank_handles_several_positives_and_misses():
  ranked = np.array([[4, 2, 0, 1], [3, 1, 2, 0], [0, 1, 2, 3]])
  ranks = metrics.first_positive_rank(ranked, [[0, 2], [0], [9]])
  np.testing.assert_array_equal(ranks, [2, 4, metrics.NOT_FOUND])
  assert metrics.recall_at_ks(ranks, (1, 2, 4)) == pytest.approx({1: 0.0, 2: 100 / 3, 4: 200 / 3})


@pytest.mark.parametrize("seed", range(5))
def test_hit_recall_matches_brute_force_with_ties(seed):
  rng = np.random.default_rng(seed)
  # Scores on a coarse grid so that ties are frequent.
  scores = rng.integers(0, 4, size=(30, 12)).astype(np.float32)
  positives = [rng.choice(12, size=rng.integers(1, 4), replace=False) for _ in range(30)]
  ranked = metrics.rank_from_scores(scores, 10)
  ranks = metrics.first_positive_rank(ranked, positives, num_candidates=12)
  for k in (1, 3, 5, 10):
    assert metrics.recall_at_ks(ranks, [k])[k] == pytest.approx(_brute_recall(scores, positives, k))


def test_short_result_padding_never_matches_positive_padding():
  # ScaNN may pad short results with -1; positive lists are padded with -1 internally.
  ranks = metrics.first_positive_rank(np.array([[-1, 3], [1, -1]]), [[0], [0, 1]])
  np.testing.assert_array_equal(ranks, [metrics.NOT_FOUND, 1])


def test_query_without_positive_is_named():
  with pytest.raises(ValueError, match="query 'q7' has no positive"):
    metrics.first_positive_rank(np.zeros((2, 3), int), [[1], []], query_ids=["q0", "q7"])


def test_positive_outside_pool_is_named():
  with pytest.raises(ValueError, match="query 'b'.*outside the pool of 3"):
    metrics.first_positive_rank(
        np.zeros((2, 3), int), [[1], [5]], query_ids=["a", "b"], num_candidates=3
    )


def test_image_text_recall_brute_force():
  rng = np.random.default_rng(0)
  num_images, per_image = 6, 5
  caption_image = np.repeat(np.arange(num_images), per_image)
  scores = rng.normal(size=(num_images, num_images * per_image))
  scores[0, 0] = scores[1, 5] = 10.0  # two guaranteed i2t hits at rank 1
  i2t = metrics.rank_from_scores(scores, 10)
  t2i = metrics.rank_from_scores(scores.T, 10)
  got = metrics.image_text_recall(i2t, t2i, caption_image)
  for k in (1, 5, 10):
    # i->t: rank of an image = best rank among its captions.
    expected_i2t = _brute_recall(
        scores, [np.flatnonzero(caption_image == i) for i in range(num_images)], k
    )
    expected_t2i = _brute_recall(scores.T, [[i] for i in caption_image], k)
    assert got[f"i2t/recall@{k}"] == pytest.approx(expected_i2t)
    assert got[f"t2i/recall@{k}"] == pytest.approx(expected_t2i)
  assert got["i2t/recall@1"] >= 100 * 2 / 6 - 1e-9
  assert got["rsum"] == pytest.approx(
      sum(got[f"{d}/recall@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  )


def test_mm2mm_metrics_hand_case():
  # 4 anchors; ranked pools of 10 (positive at ranks 1, 3, 7 and absent).
  ranked = np.array(
      [
          [5, 0, 1, 2, 3, 4, 6, 7, 8, 9],
          [0, 1, 5, 2, 3, 4, 6, 7, 8, 9],
          [0, 1, 2, 3, 4, 6, 5, 7, 8, 9],
          [0, 1, 2, 3, 4, 6, 7, 8, 9, 1],
      ]
  )
  positives = [[5], [5], [5], [5]]
  positive_scores = np.array([0.9, 0.5, 0.5, 0.2])
  negative_scores = np.array([0.1, 0.5, 0.7, np.nan])  # a tie is a miss; no negative is skipped
  kinds = ["intersection", "image_only", "intersection", ""]
  got = metrics.mm2mm_metrics(ranked, positives, positive_scores, negative_scores, kinds)
  assert got["recall@1"] == 25.0 and got["recall@5"] == 50.0 and got["recall@10"] == 75.0
  assert got["mR"] == pytest.approx(50.0)
  assert got["precision"] == pytest.approx(100 / 3)
  assert got["avg"] == pytest.approx((50.0 + 100 / 3) / 2)
  assert got["precision/intersection"] == 50.0
  assert got["precision/image_only"] == 0.0
  assert "precision/" not in got


def test_own_list_hit_at_1_counts_ties_as_misses():
  scores = [np.array([0.9, 0.1, 0.3]), np.array([0.5, 0.5]), np.array([0.2, 0.8]), np.array([1.0])]
  np.testing.assert_array_equal(metrics.own_list_hit_at_1(scores), [True, False, False, True])
  with pytest.raises(ValueError, match="query 'x' has an empty candidate list"):
    metrics.own_list_hit_at_1([np.array([])], query_ids=["x"])


def test_mean_by_group_and_macro_average():
  means = metrics.mean_by_group([1.0, 0.0, 1.0, 1.0], ["b", "a", "b", "a"])
  assert means == {"a": 0.5, "b": 1.0}
  assert metrics.macro_average(means) == 0.75
