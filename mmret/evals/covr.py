"""CoVR: composed video retrieval (a reference video + a modification text -> the target video).

Data: ``(queries, candidates)`` as ``mmret.data.importers.covr`` writes them. A candidate is a
video ``{id, image: [frames]}``; a query is ``{id, image: [reference frames], text: modification,
reference_id, target_id}``. Every query searches all candidates (the split's distinct target
videos); its one positive is ``target_id``.

Embeddings (each renormalised to unit length):
- a video: the frame aggregation (``frame_aggregation``, 'mean') of its frames' ``z_image``;
- a query, ``query_embedding='mean_of_joint'`` (default): the aggregation over its reference
  frames of ``z_joint(frame, modification text)``; ``'fusion_of_means'``: the reference video's
  embedding (as above) plus ``z_text(modification text)``.

``exclude_reference`` (default on, as in CoVR's evaluation): a candidate that is the query's own
reference video is removed from that query's ranked list, so recall is measured among the other
videos. Metrics (percent, ranks and ties as in ``mmret.evals.metrics``): ``recall@k`` for
``ks`` (1, 5, 10, 50) and ``mR``, their mean. Rankings go to ``rankings.jsonl``.

``FRAME_AGGREGATIONS`` is the hook for other frame poolings: name -> function from a video's
frame embeddings [F, d] to one vector [d] (renormalised afterwards).
"""

import collections.abc
from typing import Callable, Optional, Sequence

import numpy as np

from mmret.evals import metrics as metrics_lib
from mmret.evals.evaluator import QUERIES_CANDIDATES, Evaluator

# Record reading, embedding, search and ranking as the other query/candidate protocols do them.
from mmret.evals.protocols import (
    _Embedder,
    _positions,
    _ranked_lists,
    _read_fields,
    _scann_metrics,
    search_excluding,
    _text,
    write_rankings,
)

# The record field holding a video's frames (a list of encoded images); see the importer.
FRAMES_FIELD = "image"
QUERY_EMBEDDINGS = ("mean_of_joint", "fusion_of_means")
FRAME_AGGREGATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda frames_z: frames_z.mean(axis=0),
}


def _frame_count(value) -> int:
  """Number of frames of a record's frames field, which must be a non-empty list of bytes."""
  if isinstance(value, (bytes, str)):
    raise TypeError("expected a list of encoded frames, got a single value")
  frames = list(value)
  if not frames:
    raise ValueError("the video has no frames")
  bad = [type(f).__name__ for f in frames if not isinstance(f, bytes)]
  if bad:
    raise TypeError(f"frames must be encoded image bytes, got {bad[:3]}")
  return len(frames)


class _FrameItems(collections.abc.Sequence):
  """Embedding items, one per (record, frame): ``{id, image}`` plus ``text`` when given."""

  def __init__(self, records, pairs: Sequence[tuple[int, int]], ids, texts=None):
    self.records, self.pairs, self.ids, self.texts = records, list(pairs), ids, texts

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, i):
    row, frame = self.pairs[i]
    item = {"id": f"{self.ids[row]}#{frame}", "image": self.records[row][FRAMES_FIELD][frame]}
    if self.texts is not None:
      item["text"] = self.texts[row]
    return item


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _frame_pairs(rows: Sequence[int], counts: Sequence[int]) -> list[tuple[int, int]]:
  return [(row, frame) for row in rows for frame in range(counts[row])]


def _pool(frames_z: np.ndarray, sizes: Sequence[int], aggregate) -> np.ndarray:
  """Per consecutive group of ``sizes`` frame rows, the aggregated and renormalised vector."""
  bounds = np.cumsum([0, *sizes])
  pooled = [aggregate(frames_z[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]
  return _normalize(np.stack(pooled).astype(np.float32))


def evaluate_covr(
    predict_fn,
    *,
    data,
    input_cfg,
    workdir=None,
    params=None,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10, 50),
    query_embedding: str = "mean_of_joint",
    frame_aggregation: str = "mean",
    exclude_reference: bool = True,
    search: Optional[dict] = None,
    save_rankings: bool = False,
    batches_fn=None,
    mesh=None,
) -> dict:
  """CoVR Recall@k of each query's target video among all candidate videos (see the module doc).

  Args:
    query_embedding: 'mean_of_joint' or 'fusion_of_means'.
    frame_aggregation: a name of ``FRAME_AGGREGATIONS`` ('mean').
    exclude_reference: leave each query's reference video out of its ranking.
  """
  if query_embedding not in QUERY_EMBEDDINGS:
    raise ValueError(f"query_embedding must be one of {QUERY_EMBEDDINGS}, got {query_embedding!r}")
  if frame_aggregation not in FRAME_AGGREGATIONS:
    raise ValueError(
        f"frame_aggregation must be one of {sorted(FRAME_AGGREGATIONS)}, got {frame_aggregation!r}"
    )
  aggregate = FRAME_AGGREGATIONS[frame_aggregation]
  queries, candidates = data
  q = _read_fields(
      queries,
      {
          "id": _text,
          "text": _text,
          "reference_id": _text,
          "target_id": _text,
          FRAMES_FIELD: _frame_count,
      },
      "covr query",
  )
  c = _read_fields(candidates, {"id": _text, FRAMES_FIELD: _frame_count}, "covr candidate")
  if not c["id"]:
    raise ValueError("covr: there are no candidate videos")
  candidate_position = _positions(c["id"], "candidate")
  positives = []
  for query_id, target, reference in zip(q["id"], q["target_id"], q["reference_id"]):
    if target not in candidate_position:
      raise KeyError(f"covr query {query_id!r}: target video {target!r} is not a candidate")
    if exclude_reference and target == reference:
      raise ValueError(
          f"covr query {query_id!r}: its target is its own reference video {target!r}, which "
          "exclude_reference removes from the ranking"
      )
    positives.append([candidate_position[target]])

  embedder = _Embedder(predict_fn, input_cfg, batch_size, params, batches_fn, mesh)
  candidate_counts = c[FRAMES_FIELD]
  all_candidates = range(len(c["id"]))
  candidate_z = _pool(
      embedder.items(
          _FrameItems(candidates, _frame_pairs(all_candidates, candidate_counts), c["id"]), "image"
      ),
      candidate_counts,
      aggregate,
  )
  query_counts = q[FRAMES_FIELD]
  if query_embedding == "mean_of_joint":
    all_queries = range(len(q["id"]))
    joint_z = embedder.items(
        _FrameItems(queries, _frame_pairs(all_queries, query_counts), q["id"], q["text"]),
        "image,text",
    )
    query_z = _pool(joint_z, query_counts, aggregate)
  else:
    # Each distinct reference video is embedded once, from its first query.
    first_query = {}
    for row, reference in enumerate(q["reference_id"]):
      first_query.setdefault(reference, row)
    rows = list(first_query.values())
    reference_z = _pool(
        embedder.items(_FrameItems(queries, _frame_pairs(rows, query_counts), q["id"]), "image"),
        [query_counts[r] for r in rows],
        aggregate,
    )
    reference_row = {reference: i for i, reference in enumerate(first_query)}
    video_z = reference_z[[reference_row[r] for r in q["reference_id"]]]
    text_z = embedder.items(
        [{"id": query_id, "text": t} for query_id, t in zip(q["id"], q["text"])], "text"
    )
    query_z = _normalize(video_z + text_z)

  self_position = np.asarray(
      [candidate_position.get(r, -1) if exclude_reference else -1 for r in q["reference_id"]]
  )
  result, searched = search_excluding(
      query_z,
      candidate_z,
      self_position,
      max(ks),
      search,
      empty_error="covr: the pool has no candidates besides the reference videos",
  )
  if save_rankings:
    write_rankings(
        workdir,
        "rankings.jsonl",
        q["id"],
        *_ranked_lists(c["id"], result),
    )
  ranks = metrics_lib.first_positive_rank(
      result.indices, positives, query_ids=q["id"], num_candidates=len(c["id"])
  )
  results = {f"recall@{k}": value for k, value in metrics_lib.recall_at_ks(ranks, ks).items()}
  results["mR"] = float(np.mean([results[f"recall@{k}"] for k in ks]))
  results.update(_scann_metrics(result, "", searched))
  return results


COVR = Evaluator(evaluate_covr, data=QUERIES_CANDIDATES)
