"""Retrieval evaluation protocols: caption5 (Flickr/COCO), retrieval (M-BEIR), mm2mm (SOLAR), mmeb.

Every evaluator has the signature
  ``evaluate(predict_fn, *, data, input_cfg, workdir=None, **cfg) -> dict of metrics``
with ``predict_fn(params, batch) -> outputs`` (see ``mmret.evals.embed``) and ``data`` following the
record schemas of the shared data contract: caption5 records, or a ``(queries, candidates)`` pair.
Common options: ``params`` (passed to predict_fn), ``batch_size`` (per process), ``search``
(options of ``mmret.evals.search.search``: method, exact_max_candidates, scann, recall_samples),
``batches_fn`` / ``mesh`` (see ``embed_items``), and ``save_rankings``: write each query's ranked
candidate ids and scores as JSON lines (``rankings*.jsonl``) into ``workdir``, the evaluation's own
directory. Metrics are in percent; ranking and tie rules are those of ``mmret.evals.metrics``. When
ScaNN searches a pool, its recall@k against exact search on a sample of queries is reported as
``.../scann_recall@k``.
"""

import collections
import collections.abc
import dataclasses
import json
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from etils import epath

from mmret.evals import metrics as metrics_lib
from mmret.evals import search as search_lib
from mmret.evals.embed import EMBEDDING_KEYS, embed_items
from mmret.evals.evaluator import QUERIES_CANDIDATES, RECORDS, Evaluator

# ---------------------------------------------------------------------------------------------
# Records.


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _text(value.item())
  return str(value)


def _str_list(value) -> list[str]:
  if value is None:
    return []
  if isinstance(value, (str, bytes)):
    raise TypeError(f"expected a list of strings, got a single string {value!r}")
  return [_text(v) for v in value]


def _field(record: dict, name: str, where: str):
  if name not in record:
    raise KeyError(f"{where}: record has no field {name!r} (fields: {sorted(record)})")
  return record[name]


def _read_fields(records: Sequence[dict], fields: dict[str, Callable], what: str) -> dict:
  """Reads ``fields`` (name -> converter) of every record into lists, naming bad records."""
  columns = {name: [] for name in fields}
  for i in range(len(records)):
    record = records[i]
    where = f"{what} #{i} (id {record.get('id', '?')!r})"
    for name, convert in fields.items():
      try:
        columns[name].append(convert(_field(record, name, where)))
      except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: bad field {name!r}: {e}") from e
  return columns


def _check_modalities(modalities: Sequence[str], ids: Sequence[str], what: str):
  for modality, record_id in zip(modalities, ids):
    if modality not in EMBEDDING_KEYS:
      raise ValueError(
          f"{what} {record_id!r}: modality {modality!r} is not one of " f"{sorted(EMBEDDING_KEYS)}"
      )


def _with_instruction(instruction: str, text: str) -> str:
  return f"{instruction} {text}".strip() if instruction else text


class _Items(collections.abc.Sequence):
  """Lazy view of ``records[rows]`` as embedding items holding only ``modality``'s inputs."""

  def __init__(
      self, records, rows: Sequence[int], modality: str, texts: Optional[Sequence[str]] = None
  ):
    self.records, self.rows, self.texts = records, list(rows), texts
    self.parts = set(modality.split(","))

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    record = self.records[self.rows[i]]
    item = {"id": _text(record.get("id", self.rows[i]))}
    if "image" in self.parts:
      item["image"] = record["image"]
    if "text" in self.parts:
      item["text"] = self.texts[i] if self.texts is not None else _text(record["text"])
    return item


@dataclasses.dataclass
class _Embedder:
  """Binds the embedding-pass options shared by all evaluators."""

  predict_fn: Callable
  input_cfg: Any
  batch_size: int
  params: Any = None
  batches_fn: Optional[Callable] = None
  mesh: Any = None

  def items(self, items: Sequence[dict], modality: str) -> np.ndarray:
    return embed_items(
        self.predict_fn,
        items,
        modality,
        input_cfg=self.input_cfg,
        batch_size=self.batch_size,
        params=self.params,
        batches_fn=self.batches_fn,
        mesh=self.mesh,
    )

  def records(
      self, records, modalities: Sequence[str], texts: Optional[Sequence[str]] = None
  ) -> np.ndarray:
    """Embeds every record with its own modality; returns [len(records), d] in record order."""
    rows_by_modality = collections.defaultdict(list)
    for row, modality in enumerate(modalities):
      rows_by_modality[modality].append(row)
    out = None
    for modality, rows in sorted(rows_by_modality.items()):
      group_texts = [texts[r] for r in rows] if texts is not None else None
      z = self.items(_Items(records, rows, modality, group_texts), modality)
      if out is None:
        out = np.zeros((len(modalities), z.shape[1]), np.float32)
      out[rows] = z
    return out if out is not None else np.zeros((0, 0), np.float32)


def _search(queries, candidates, k: int, search_cfg: Optional[dict]):
  return search_lib.search(queries, candidates, k, **dict(search_cfg or {}))


def _scann_metrics(result: search_lib.SearchResult, prefix: str, k: int) -> dict:
  if result.method != "scann":
    return {}
  return {f"{prefix}scann_recall@{k}": 100.0 * result.info["recall_vs_exact"]}


def _positions(ids: Sequence[str], what: str) -> dict[str, int]:
  positions = {}
  for i, record_id in enumerate(ids):
    if record_id in positions:
      raise ValueError(f"{what} id {record_id!r} appears twice (rows {positions[record_id]}, {i})")
    positions[record_id] = i
  return positions


def write_rankings(
    workdir: Optional[str],
    filename: str,
    query_ids: Sequence[str],
    ranked_ids: Sequence[Sequence[str]],
    ranked_scores: Sequence[Sequence[float]],
):
  """Writes one JSON line per query: ``{query_id, candidate_ids, scores}`` (process 0 only)."""
  if workdir is None or jax.process_index() != 0:
    return
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with (workdir / filename).open("w") as f:
    for query_id, ids, scores in zip(query_ids, ranked_ids, ranked_scores):
      f.write(
          json.dumps(
              {
                  "query_id": query_id,
                  "candidate_ids": [str(i) for i in ids],
                  "scores": [round(float(x), 6) for x in scores],
              }
          )
          + "\n"
      )


def _ranked_lists(ids: Sequence[str], result: search_lib.SearchResult):
  """Per query, the ranked candidate ids and their scores (entries without a result dropped)."""
  ranked_ids, ranked_scores = [], []
  for positions, scores in zip(result.indices, result.scores):
    found = positions >= 0
    ranked_ids.append([ids[p] for p in positions[found]])
    ranked_scores.append(scores[found])
  return ranked_ids, ranked_scores


def _positives_in_pool(
    positives: Sequence[Sequence[int]],
    pool_rows: np.ndarray,
    query_ids: Sequence[str],
    pool_name: str,
) -> list[list[int]]:
  """Maps positives (candidate rows) to positions within ``pool_rows``; each query keeps one."""
  position_in_pool = {int(row): i for i, row in enumerate(pool_rows)}
  out = []
  for query_id, rows in zip(query_ids, positives):
    inside = [position_in_pool[r] for r in rows if r in position_in_pool]
    if not inside:
      raise ValueError(f"query {query_id!r}: none of its positives is in the {pool_name} pool")
    out.append(inside)
  return out


def _positive_positions(query_ids, positive_ids, candidate_position) -> list[list[int]]:
  out = []
  for query_id, positives in zip(query_ids, positive_ids):
    if not positives:
      raise ValueError(f"query {query_id!r} has no positive candidate")
    unknown = [p for p in positives if p not in candidate_position]
    if unknown:
      raise KeyError(f"query {query_id!r}: positive ids {unknown} are not among the candidates")
    out.append([candidate_position[p] for p in positives])
  return out


# ---------------------------------------------------------------------------------------------
# caption5: Flickr30K / COCO image<->text retrieval.


def evaluate_caption5(
    predict_fn,
    *,
    data,
    input_cfg,
    workdir=None,
    params=None,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
    fold_size: Optional[int] = None,
    search: Optional[dict] = None,
    save_rankings: bool = False,
    batches_fn=None,
    mesh=None,
) -> dict:
  """Image<->text recall over records ``{id, image, captions}`` (any number of captions each).

  ``fold_size`` (COCO-1K: 1000) adds ``folds/...``: the mean over consecutive folds of that many
  images (with their captions); the unprefixed metrics use all images (COCO-5K).
  """
  records = data
  columns = _read_fields(records, {"id": _text, "captions": _str_list}, "caption5 record")
  captions, caption_image = [], []
  for image, (record_id, texts) in enumerate(zip(columns["id"], columns["captions"])):
    if not texts:
      raise ValueError(f"caption5 record {record_id!r} has no captions")
    captions += [{"id": f"{record_id}/{j}", "text": t} for j, t in enumerate(texts)]
    caption_image += [image] * len(texts)
  caption_image = np.asarray(caption_image, np.int64)
  embedder = _Embedder(predict_fn, input_cfg, batch_size, params, batches_fn, mesh)
  image_z = embedder.items(_Items(records, range(len(records)), "image"), "image")
  text_z = embedder.items(captions, "text")
  top = max(ks)

  def score(image_rows, prefix):
    in_fold = np.isin(caption_image, image_rows)
    fold_text_z = text_z[in_fold]
    # Re-number captions' images within the fold.
    fold_caption_image = np.searchsorted(image_rows, caption_image[in_fold])
    i2t = _search(image_z[image_rows], fold_text_z, top, search)
    t2i = _search(fold_text_z, image_z[image_rows], top, search)
    out = metrics_lib.image_text_recall(
        i2t.indices,
        t2i.indices,
        fold_caption_image,
        ks=ks,
        image_ids=[columns["id"][r] for r in image_rows],
    )
    out.update(_scann_metrics(i2t, "i2t/", top))
    out.update(_scann_metrics(t2i, "t2i/", top))
    if save_rankings and not prefix:
      caption_ids = [item["id"] for item in captions]
      write_rankings(workdir, "rankings_i2t.jsonl", columns["id"], *_ranked_lists(caption_ids, i2t))
      write_rankings(workdir, "rankings_t2i.jsonl", caption_ids, *_ranked_lists(columns["id"], t2i))
    return {prefix + key: value for key, value in out.items()}

  results = score(np.arange(len(records)), "")
  if fold_size:
    num_folds = len(records) // fold_size
    if num_folds == 0:
      raise ValueError(f"fold_size={fold_size} exceeds the {len(records)} images")
    folds = [
        score(np.arange(f * fold_size, (f + 1) * fold_size), "folds/") for f in range(num_folds)
    ]
    results.update({key: float(np.mean([fold[key] for fold in folds])) for key in folds[0]})
  return results


# ---------------------------------------------------------------------------------------------
# retrieval: M-BEIR style, local pools and the global pool.


def _query_columns(queries, use_instruction: bool, extra: dict) -> dict:
  fields = {"id": _text, "modality": _text, "text": _text, "task": _text}
  if use_instruction:
    fields["instruction"] = _text
  fields.update(extra)
  columns = _read_fields(queries, fields, "query")
  _check_modalities(columns["modality"], columns["id"], "query")
  columns["task"] = [task or "all" for task in columns["task"]]
  columns["query_text"] = (
      [_with_instruction(i, t) for i, t in zip(columns["instruction"], columns["text"])]
      if use_instruction
      else columns["text"]
  )
  return columns


def _candidate_columns(candidates, extra: dict) -> dict:
  columns = _read_fields(candidates, {"id": _text, "modality": _text, **extra}, "candidate")
  _check_modalities(columns["modality"], columns["id"], "candidate")
  return columns


def evaluate_retrieval(
    predict_fn,
    *,
    data,
    input_cfg,
    workdir=None,
    params=None,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10, 50),
    recall_k: int = 5,
    recall_k_by_pool: Optional[dict] = None,
    pools: Sequence[str] = ("local", "global"),
    use_instruction: bool = False,
    search: Optional[dict] = None,
    save_rankings: bool = False,
    batches_fn=None,
    mesh=None,
) -> dict:
  """M-BEIR hit-style recall, per task, in each query's local pool and/or the global pool.

  Args:
    ks: cut-offs reported per task (the recall curves).
    recall_k: the headline cut-off of a task (M-BEIR: 5) ...
    recall_k_by_pool: ... unless its queries' pool is listed here (M-BEIR: fashioniq and
      fashion200k -> 10). ``<pool kind>/average`` is the mean over tasks of their headline recall.
    pools: 'local' (each query searches the candidates of its own ``pool``) and/or 'global' (all).
    use_instruction: prefix query texts with their ``instruction``.
  Rankings go to ``rankings_local.jsonl`` / ``rankings_global.jsonl``.
  """
  unknown = set(pools) - {"local", "global"}
  if unknown or not pools:
    raise ValueError(f"pools must be a non-empty subset of ('local', 'global'), got {pools}")
  queries, candidates = data
  recall_k_by_pool = dict(recall_k_by_pool or {})
  q = _query_columns(queries, use_instruction, {"pool": _text, "positive_ids": _str_list})
  c = _candidate_columns(candidates, {"pool": _text})
  candidate_position = _positions(c["id"], "candidate")
  positives = _positive_positions(q["id"], q["positive_ids"], candidate_position)

  # Each task is scored at one headline cut-off, given by its queries' pool.
  task_k = {}
  for query_id, task, pool in zip(q["id"], q["task"], q["pool"]):
    k = int(recall_k_by_pool.get(pool, recall_k))
    if task_k.setdefault(task, k) != k:
      raise ValueError(
          f"task {task!r} mixes pools scored at Recall@{task_k[task]} and "
          f"Recall@{k} (query {query_id!r}, pool {pool!r})"
      )
  all_ks = sorted(set(int(k) for k in ks) | set(task_k.values()))
  top = max(all_ks)

  embedder = _Embedder(predict_fn, input_cfg, batch_size, params, batches_fn, mesh)
  query_z = embedder.records(queries, q["modality"], q["query_text"])
  candidate_z = embedder.records(candidates, c["modality"])

  results = {}
  for kind in pools:
    ranks = np.zeros(len(q["id"]), np.int64)
    ranked_ids, ranked_scores = [None] * len(q["id"]), [None] * len(q["id"])
    if kind == "global":
      groups = [("global/", np.arange(len(q["id"])), np.arange(len(c["id"])))]
    else:
      groups = [
          (
              f"local/{pool}/",
              np.flatnonzero(np.asarray(q["pool"]) == pool),
              np.flatnonzero(np.asarray(c["pool"]) == pool),
          )
          for pool in sorted(set(q["pool"]))
      ]
    for prefix, query_rows, pool_rows in groups:
      if pool_rows.size == 0:
        raise ValueError(f"{prefix[:-1]}: the pool has no candidates")
      local_positives = _positives_in_pool(
          [positives[r] for r in query_rows],
          pool_rows,
          [q["id"][r] for r in query_rows],
          prefix[:-1],
      )
      result = _search(query_z[query_rows], candidate_z[pool_rows], top, search)
      ranks[query_rows] = metrics_lib.first_positive_rank(
          result.indices,
          local_positives,
          query_ids=[q["id"][r] for r in query_rows],
          num_candidates=pool_rows.size,
      )
      results.update(_scann_metrics(result, prefix, top))
      pool_ids = [c["id"][r] for r in pool_rows]
      for row, ids, scores in zip(query_rows, *_ranked_lists(pool_ids, result)):
        ranked_ids[row], ranked_scores[row] = ids, scores
    if save_rankings:
      write_rankings(workdir, f"rankings_{kind}.jsonl", q["id"], ranked_ids, ranked_scores)
    tasks = np.asarray(q["task"])
    headline = {}
    for task in sorted(task_k):
      task_ranks = ranks[tasks == task]
      for k, value in metrics_lib.recall_at_ks(task_ranks, all_ks).items():
        results[f"{kind}/{task}/recall@{k}"] = value
      headline[task] = results[f"{kind}/{task}/recall@{task_k[task]}"]
    results[f"{kind}/average"] = metrics_lib.macro_average(headline)
  return results


# ---------------------------------------------------------------------------------------------
# mm2mm: SOLAR's triplet protocol in a pool of image+text pairs.


def search_excluding(query_z, candidate_z, self_position, k: int, search, *, empty_error: str):
  """Top-``k`` search in which query i never finds candidate ``self_position[i]`` (-1: none).

  Returns (result, the number of neighbours searched: ``k``, or one more when a query may find
  its own candidate and drop it).
  """
  # One more neighbour when some query may find (and drop) its own candidate.
  extra = int((self_position >= 0).any())
  top = min(k, len(candidate_z) - extra)
  if top < 1:
    raise ValueError(empty_error)
  result = _search(query_z, candidate_z, top + extra, search)
  if extra:
    indices, scores = _drop_self(result.indices, result.scores, self_position, top)
    result = dataclasses.replace(result, indices=indices, scores=scores)
  return result, top + extra


def _drop_self(indices: np.ndarray, scores: np.ndarray, self_position: np.ndarray, k: int):
  """Removes each query's own candidate (if present) from its ranked list and keeps k entries."""
  kept_indices = np.empty((indices.shape[0], k), np.int64)
  kept_scores = np.empty((indices.shape[0], k), np.float32)
  for i, (row, own) in enumerate(zip(indices, self_position)):
    keep = row != own if own >= 0 else np.ones(row.shape, bool)
    kept_indices[i], kept_scores[i] = row[keep][:k], scores[i][keep][:k]
  return kept_indices, kept_scores


def evaluate_mm2mm(
    predict_fn,
    *,
    data,
    input_cfg,
    workdir=None,
    params=None,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
    use_instruction: bool = False,
    exclude_self: bool = True,
    search: Optional[dict] = None,
    save_rankings: bool = False,
    batches_fn=None,
    mesh=None,
) -> dict:
  """MM2MM: anchors search all candidates; Recall@k, mR, Precision (by negative kind), Avg.

  Precision compares sim(anchor, positive) (best positive when there are several) with
  sim(anchor, ``negative_id``); anchors without a negative are left out of it.
  ``exclude_self`` drops a candidate carrying the anchor's own id from its ranked list.
  Rankings go to ``rankings.jsonl``.
  """
  queries, candidates = data
  q = _query_columns(
      queries,
      use_instruction,
      {"positive_ids": _str_list, "negative_id": _text, "negative_kind": _text},
  )
  c = _candidate_columns(candidates, {})
  candidate_position = _positions(c["id"], "candidate")
  positives = _positive_positions(q["id"], q["positive_ids"], candidate_position)
  embedder = _Embedder(predict_fn, input_cfg, batch_size, params, batches_fn, mesh)
  query_z = embedder.records(queries, q["modality"], q["query_text"])
  candidate_z = embedder.records(candidates, c["modality"])

  self_position = np.asarray(
      [candidate_position.get(i, -1) if exclude_self else -1 for i in q["id"]]
  )
  result, searched = search_excluding(
      query_z,
      candidate_z,
      self_position,
      max(ks),
      search,
      empty_error="the mm2mm pool has no candidates besides the anchors themselves",
  )
  ranked = result.indices
  if save_rankings:
    write_rankings(workdir, "rankings.jsonl", q["id"], *_ranked_lists(c["id"], result))

  positive_scores = np.asarray([np.max(candidate_z[p] @ z) for p, z in zip(positives, query_z)])
  negative_scores = np.full(len(q["id"]), np.nan)
  for i, (query_id, negative_id) in enumerate(zip(q["id"], q["negative_id"])):
    if negative_id:
      if negative_id not in candidate_position:
        raise KeyError(f"query {query_id!r}: negative id {negative_id!r} is not a candidate")
      negative_scores[i] = candidate_z[candidate_position[negative_id]] @ query_z[i]
  results = metrics_lib.mm2mm_metrics(
      ranked,
      positives,
      positive_scores,
      negative_scores,
      q["negative_kind"],
      ks=ks,
      query_ids=q["id"],
      num_candidates=len(c["id"]),
  )
  results.update(_scann_metrics(result, "", searched))
  return results


# ---------------------------------------------------------------------------------------------
# mmeb: each query ranks its own candidate list, the first being correct.


def evaluate_mmeb(
    predict_fn,
    *,
    data,
    input_cfg,
    workdir=None,
    params=None,
    batch_size: int = 64,
    use_instruction: bool = True,
    save_rankings: bool = False,
    batches_fn=None,
    mesh=None,
) -> dict:
  """MMEB retrieval Hit@1 per task and its mean over tasks (``average/hit@1``).

  Only candidates named in some query's ``candidate_ids`` are embedded. A tie between the correct
  candidate and another counts as a miss. Rankings (each query's own list re-ordered by score)
  go to ``rankings.jsonl``.
  """
  queries, candidates = data
  q = _query_columns(queries, use_instruction, {"candidate_ids": _str_list})
  c = _candidate_columns(candidates, {})
  candidate_position = _positions(c["id"], "candidate")
  for query_id, listed in zip(q["id"], q["candidate_ids"]):
    if not listed:
      raise ValueError(f"query {query_id!r} has an empty candidate_ids list")
    unknown = [i for i in listed if i not in candidate_position]
    if unknown:
      raise KeyError(f"query {query_id!r}: candidate ids {unknown[:5]} are not candidates")
  used = sorted({candidate_position[i] for listed in q["candidate_ids"] for i in listed})
  used_row = {row: i for i, row in enumerate(used)}

  embedder = _Embedder(predict_fn, input_cfg, batch_size, params, batches_fn, mesh)
  query_z = embedder.records(queries, q["modality"], q["query_text"])
  used_candidates = _Subset(candidates, used)
  candidate_z = embedder.records(used_candidates, [c["modality"][r] for r in used])

  scores = [
      candidate_z[[used_row[candidate_position[i]] for i in listed]] @ z
      for listed, z in zip(q["candidate_ids"], query_z)
  ]
  hits = metrics_lib.own_list_hit_at_1(scores, query_ids=q["id"])
  if save_rankings:
    orders = [np.argsort(-s, kind="stable") for s in scores]
    ranked_ids = [[listed[j] for j in order] for listed, order in zip(q["candidate_ids"], orders)]
    write_rankings(
        workdir,
        "rankings.jsonl",
        q["id"],
        ranked_ids,
        [s[order] for s, order in zip(scores, orders)],
    )
  per_task = {task: 100.0 * v for task, v in metrics_lib.mean_by_group(hits, q["task"]).items()}
  results = {f"{task}/hit@1": value for task, value in per_task.items()}
  results["average/hit@1"] = metrics_lib.macro_average(per_task)
  return results


class _Subset(collections.abc.Sequence):
  """``records[rows]`` as a random-access sequence."""

  def __init__(self, records, rows: Sequence[int]):
    self.records, self.rows = records, list(rows)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return self.records[self.rows[i]]


CAPTION5 = Evaluator(evaluate_caption5, data=RECORDS)
RETRIEVAL = Evaluator(evaluate_retrieval, data=QUERIES_CANDIDATES)
MM2MM = Evaluator(evaluate_mm2mm, data=QUERIES_CANDIDATES)
MMEB = Evaluator(evaluate_mmeb, data=QUERIES_CANDIDATES)
