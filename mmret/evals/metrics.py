"""Retrieval metrics: pure numpy functions of score matrices or ranked candidate lists.

Conventions
- A ranked list is an int array [Q, K] of candidate positions, best first (as returned by
  ``mmret.evals.search``). Ranking is by descending score with ties broken by ascending candidate
  position (``rank_from_scores`` below, ``jax.lax.top_k`` and exact search all follow it), so a
  positive tied with a negative ranks first when it comes earlier in the pool.
- Hit-style Recall@k: a query is a hit when any of its positives is among its first k results.
- Metrics that compare two scores directly (MM2MM Precision, MMEB Hit@1) count a tie as a miss.
- Recall, precision and hit rates are reported in percent.
"""

from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

# Ranks are 1-based; 0 marks "no positive in the ranked list".
NOT_FOUND = 0


def rank_from_scores(scores, k: Optional[int] = None) -> np.ndarray:
  """Ranked candidate positions [Q, k] from a score matrix [Q, N] (ties by ascending position)."""
  scores = np.asarray(scores)
  order = np.argsort(-scores, axis=1, kind="stable")
  return order if k is None else order[:, :k]


def _query_name(query_ids, i) -> str:
  return repr(query_ids[i]) if query_ids is not None else f"#{i}"


def _positive_matrix(
    positives: Sequence[Iterable[int]], num_queries: int, query_ids, num_candidates: Optional[int]
) -> np.ndarray:
  """Pads per-query positive lists into a [Q, P] int matrix (-1 = padding), checking them."""
  if len(positives) != num_queries:
    raise ValueError(f"got {len(positives)} positive lists for {num_queries} queries")
  lists = [np.asarray(list(p), dtype=np.int64).reshape(-1) for p in positives]
  for i, p in enumerate(lists):
    if p.size == 0:
      raise ValueError(f"query {_query_name(query_ids, i)} has no positive candidate")
    if p.min() < 0 or (num_candidates is not None and p.max() >= num_candidates):
      raise ValueError(
          f"query {_query_name(query_ids, i)} has a positive outside the pool "
          f"of {num_candidates} candidates: {p.tolist()}"
      )
  width = max((p.size for p in lists), default=1)
  matrix = np.full((num_queries, width), -1, np.int64)
  for i, p in enumerate(lists):
    matrix[i, : p.size] = p
  return matrix


def first_positive_rank(
    ranked,
    positives: Sequence[Iterable[int]],
    *,
    query_ids: Optional[Sequence[str]] = None,
    num_candidates: Optional[int] = None,
    chunk: int = 4096,
) -> np.ndarray:
  """1-based rank of each query's best-ranked positive in its ranked list (0 if absent).

  Args:
    ranked: [Q, K] candidate positions, best first.
    positives: per query, the positions of its positive candidates (at least one).
    query_ids: names used in error messages.
    num_candidates: pool size, to reject out-of-range positives.
  """
  ranked = np.asarray(ranked, dtype=np.int64)
  if ranked.ndim != 2:
    raise ValueError(f"ranked must be [Q, K], got shape {ranked.shape}")
  pos = _positive_matrix(positives, ranked.shape[0], query_ids, num_candidates)
  ranks = np.zeros(ranked.shape[0], np.int64)
  for start in range(0, ranked.shape[0], chunk):
    r, p = ranked[start : start + chunk], pos[start : start + chunk]
    # hits[q, j]: the j-th result of query q is one of its positives. Negative entries (padding
    # of positive lists, or of a short approximate result) never count.
    hits = (r[:, :, None] == p[:, None, :]).any(axis=-1) & (r >= 0)
    found = hits.any(axis=1)
    ranks[start : start + chunk] = np.where(found, hits.argmax(axis=1) + 1, NOT_FOUND)
  return ranks


def hits_at(ranks, k: int) -> np.ndarray:
  """Per-query hit indicator for Recall@k from first-positive ranks."""
  ranks = np.asarray(ranks)
  return (ranks != NOT_FOUND) & (ranks <= k)


def recall_at_ks(ranks, ks: Sequence[int]) -> dict[int, float]:
  """Hit-style Recall@k in percent for each k, from first-positive ranks."""
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    raise ValueError("recall of an empty query set is undefined")
  return {int(k): 100.0 * float(hits_at(ranks, k).mean()) for k in ks}


def image_text_recall(
    i2t_ranked,
    t2i_ranked,
    caption_image,
    *,
    ks: Sequence[int] = (1, 5, 10),
    image_ids: Optional[Sequence[str]] = None,
) -> dict[str, float]:
  """Flickr/COCO image<->text retrieval with several captions per image.

  Args:
    i2t_ranked: [I, K] caption positions ranked for each image.
    t2i_ranked: [T, K] image positions ranked for each caption.
    caption_image: [T] the image position each caption describes.
    ks: recall cut-offs; ``rsum`` sums the i2t and t2i recalls at (1, 5, 10) when all present.
  Returns:
    ``i2t/recall@k``, ``t2i/recall@k`` in percent, and ``rsum``. The rank of an image in i2t is
    the best rank among its captions.
  """
  caption_image = np.asarray(caption_image, dtype=np.int64)
  num_images = np.asarray(i2t_ranked).shape[0]
  captions_of = [[] for _ in range(num_images)]
  for caption, image in enumerate(caption_image):
    if not 0 <= image < num_images:
      raise ValueError(f"caption #{caption} points to image {image}, outside 0..{num_images - 1}")
    captions_of[image].append(caption)
  i2t_ranks = first_positive_rank(
      i2t_ranked, captions_of, query_ids=image_ids, num_candidates=caption_image.size
  )
  t2i_ranks = first_positive_rank(t2i_ranked, caption_image[:, None], num_candidates=num_images)
  metrics = {}
  for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
    for k, value in recall_at_ks(ranks, ks).items():
      metrics[f"{direction}/recall@{k}"] = value
  if all(k in ks for k in (1, 5, 10)):
    metrics["rsum"] = sum(metrics[f"{d}/recall@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  return metrics


def pair_precision(positive_scores, negative_scores) -> float:
  """Percent of triplets whose positive scores strictly above their hard negative (ties miss)."""
  positive_scores = np.asarray(positive_scores, np.float64)
  negative_scores = np.asarray(negative_scores, np.float64)
  if positive_scores.size == 0:
    return float("nan")
  return 100.0 * float(np.mean(positive_scores > negative_scores))


def mm2mm_metrics(
    ranked,
    positives,
    positive_scores,
    negative_scores,
    negative_kinds: Optional[Sequence[str]] = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    query_ids: Optional[Sequence[str]] = None,
    num_candidates: Optional[int] = None,
) -> dict[str, float]:
  """MM2MM (SOLAR) metrics: Recall@k, mR, Precision, Avg, and Precision per negative kind.

  Args:
    ranked: [Q, K] pool positions ranked for each anchor.
    positives: per anchor, positions of its positive(s) in the pool.
    positive_scores: [Q] sim(anchor, positive) (the best positive when there are several).
    negative_scores: [Q] sim(anchor, hard negative); NaN for anchors without a hard negative,
      which are left out of Precision.
    negative_kinds: [Q] kind of each hard negative ('intersection', 'image_only', 'text_only').
  Returns:
    ``recall@k`` (percent), ``mR`` = mean of the recalls, ``precision`` (percent of triplets with
    sim(anchor, positive) > sim(anchor, negative)), ``avg`` = (mR + precision) / 2 and
    ``precision/<kind>`` for each kind present.
  """
  ranks = first_positive_rank(ranked, positives, query_ids=query_ids, num_candidates=num_candidates)
  metrics = {f"recall@{k}": v for k, v in recall_at_ks(ranks, ks).items()}
  metrics["mR"] = float(np.mean([metrics[f"recall@{k}"] for k in ks]))
  positive_scores = np.asarray(positive_scores, np.float64)
  negative_scores = np.asarray(negative_scores, np.float64)
  if positive_scores.shape != ranks.shape or negative_scores.shape != ranks.shape:
    raise ValueError(
        f"positive_scores {positive_scores.shape} and negative_scores "
        f"{negative_scores.shape} must both be [{ranks.size}]"
    )
  has_negative = ~np.isnan(negative_scores)
  metrics["precision"] = pair_precision(
      positive_scores[has_negative], negative_scores[has_negative]
  )
  metrics["avg"] = (metrics["mR"] + metrics["precision"]) / 2
  if negative_kinds is not None:
    kinds = np.asarray([str(kind) for kind in negative_kinds])
    for kind in sorted(set(kinds[has_negative].tolist()) - {""}):
      chosen = has_negative & (kinds == kind)
      metrics[f"precision/{kind}"] = pair_precision(
          positive_scores[chosen], negative_scores[chosen]
      )
  return metrics


def own_list_hit_at_1(
    candidate_scores: Sequence[np.ndarray], *, query_ids: Optional[Sequence[str]] = None
) -> np.ndarray:
  """MMEB Hit@1 per query: its first listed candidate (the correct one) scores strictly highest.

  Args:
    candidate_scores: per query, the scores of its own candidate list, correct candidate first.
  Returns:
    bool [Q]; a tie between the correct candidate and another counts as a miss.
  """
  hits = np.zeros(len(candidate_scores), bool)
  for i, scores in enumerate(candidate_scores):
    scores = np.asarray(scores, np.float64).reshape(-1)
    if scores.size == 0:
      raise ValueError(f"query {_query_name(query_ids, i)} has an empty candidate list")
    hits[i] = scores.size == 1 or scores[0] > scores[1:].max()
  return hits


def mean_by_group(values, groups: Sequence[str]) -> dict[str, float]:
  """Mean of ``values`` for each distinct group name (sorted by name)."""
  values = np.asarray(values, np.float64)
  groups = np.asarray([str(g) for g in groups])
  if values.shape != groups.shape:
    raise ValueError(f"values {values.shape} and groups {groups.shape} differ in shape")
  return {g: float(values[groups == g].mean()) for g in sorted(set(groups.tolist()))}


def macro_average(metrics: Mapping[str, float]) -> float:
  """Unweighted mean of per-group metrics (e.g. the M-BEIR average over tasks)."""
  return float(np.mean(list(metrics.values()))) if metrics else float("nan")
