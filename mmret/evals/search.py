"""Maximum inner-product search: exact (blocked, jitted) and approximate (ScaNN).

Both return ``(scores [Q,k] float32, indices [Q,k] int64)`` ranked by descending score.
Exact search ranks ties by ascending candidate index, like ``jax.lax.top_k`` and a stable argsort
(see ``mmret.evals.metrics``). It never holds more than a ``query_block x candidate_block`` score
matrix, so pools of millions are searched in bounded memory. ScaNN (tree partitioning +
anisotropic hashing + exact re-ordering) is used for pools of at least ``exact_max_candidates``;
its recall against exact search on a sample of queries is measured and returned with the results.
"""

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mmret import progress

# Defaults shared by `search` and the evaluators' configs.
EXACT_MAX_CANDIDATES = 50_000
RECALL_SAMPLES = 1_000
# An exact search scoring at least this many query-candidate pairs logs a line when it starts;
# smaller ones log only when they run longer than PROGRESS_MIN_SECONDS.
ANNOUNCE_MIN_PAIRS = 10**9
PROGRESS_MIN_SECONDS = 10.0


def _as_matrix(x, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a [n, d] matrix, got shape {x.shape}")
  return x


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_block(best_scores, best_ids, queries, block, offset, *, k):
  """Scores one candidate block and merges it into the running top-k.

  The running entries come first in the concatenation and hold lower candidate indices than the
  block, so ``lax.top_k``'s lower-position-first rule keeps ties in candidate order.
  """
  scores = jnp.matmul(queries, block.T, precision=jax.lax.Precision.HIGHEST)
  ids = offset + jnp.arange(block.shape[0], dtype=jnp.int32)
  ids = jnp.broadcast_to(ids, scores.shape)
  all_scores = jnp.concatenate([best_scores, scores], axis=1)
  all_ids = jnp.concatenate([best_ids, ids], axis=1)
  top_scores, positions = jax.lax.top_k(all_scores, k)
  return top_scores, jnp.take_along_axis(all_ids, positions, axis=1)


def exact_search(
    queries, candidates, k: int, *, query_block: int = 1024, candidate_block: int = 32_768
):
  """Exact top-k by inner product, in blocks of queries x candidates.

  Args:
    queries: [Q, d] query embeddings.
    candidates: [N, d] candidate embeddings.
    k: neighbours per query (clipped to N).
    query_block, candidate_block: block sizes; peak score memory is their product x 4 bytes.
  Returns:
    (scores [Q, k] float32, indices [Q, k] int64), best first, ties by ascending index.
  """
  queries = _as_matrix(queries, "queries")
  candidates = _as_matrix(candidates, "candidates")
  if queries.shape[1] != candidates.shape[1]:
    raise ValueError(f"queries have width {queries.shape[1]}, candidates {candidates.shape[1]}")
  if candidates.shape[0] == 0:
    raise ValueError("exact_search needs at least one candidate")
  k = min(k, candidates.shape[0])
  device_candidates = jax.device_put(candidates)
  all_scores, all_ids = [], []
  counter = progress.Progress(
      f"exact search: {queries.shape[0]} queries x {candidates.shape[0]} candidates",
      -(-queries.shape[0] // query_block),
      unit="query blocks",
      warmup=True,
      announce=queries.shape[0] * candidates.shape[0] >= ANNOUNCE_MIN_PAIRS,
      min_seconds=PROGRESS_MIN_SECONDS,
  )
  for q0 in range(0, queries.shape[0], query_block):
    q = jax.device_put(queries[q0 : q0 + query_block])
    best_scores = jnp.full((q.shape[0], k), -jnp.inf, jnp.float32)
    best_ids = jnp.full((q.shape[0], k), -1, jnp.int32)
    for c0 in range(0, candidates.shape[0], candidate_block):
      block = device_candidates[c0 : c0 + candidate_block]
      best_scores, best_ids = _merge_block(best_scores, best_ids, q, block, jnp.int32(c0), k=k)
    all_scores.append(np.asarray(best_scores))
    all_ids.append(np.asarray(best_ids))
    counter.update()  # the block's results are on the host: counting waits for nothing more
  counter.finish()
  if not all_scores:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  return np.concatenate(all_scores), np.concatenate(all_ids).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class ScannParams:
  """ScaNN index settings (see ``scann_params`` for the defaults derived from the pool size)."""

  num_leaves: int  # k-means partitions of the pool
  leaves_to_search: int  # partitions scanned per query
  reorder: int  # candidates re-scored exactly after hashing (>= k)
  dims_per_block: int = 2  # asymmetric hashing: dimensions per 16-centre codebook
  anisotropic_threshold: float = 0.2  # anisotropic quantisation threshold (for unit vectors)
  training_sample_size: int = 100_000  # points used to train partitions and codebooks


def scann_params(
    num_candidates: int,
    k: int = 10,
    *,
    leaves_fraction: float = 0.1,
    min_leaves_to_search: int = 16,
    reorder_factor: int = 10,
    **overrides,
) -> ScannParams:
  """ScaNN settings for a pool of ``num_candidates``, any field overridable by keyword.

  Defaults: num_leaves ~ sqrt(N) (balances partition scoring against in-partition scanning),
  leaves_to_search = max(min_leaves_to_search, leaves_fraction * num_leaves),
  reorder = max(100, reorder_factor * k).
  """
  num_leaves = max(1, int(round(math.sqrt(num_candidates))))
  leaves_to_search = min(
      num_leaves, max(min_leaves_to_search, int(math.ceil(leaves_fraction * num_leaves)))
  )
  defaults = dict(
      num_leaves=num_leaves,
      leaves_to_search=leaves_to_search,
      reorder=max(100, reorder_factor * k),
      training_sample_size=min(num_candidates, 100_000),
  )
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ScannParams)}
  if unknown:
    raise ValueError(
        f"unknown ScaNN parameters {sorted(unknown)}; "
        f"known: {[f.name for f in dataclasses.fields(ScannParams)]}"
    )
  defaults.update({key: value for key, value in overrides.items() if value is not None})
  return ScannParams(**defaults)


def build_scann(candidates, k: int, params: ScannParams):
  """Builds a ScaNN dot-product searcher over ``candidates`` returning ``k`` neighbours."""
  import scann  # Imported here: building an index is the only place that needs it.

  candidates = _as_matrix(candidates, "candidates")
  k = min(k, candidates.shape[0])
  num_leaves = min(params.num_leaves, candidates.shape[0])
  builder = scann.scann_ops_pybind.builder(candidates, k, "dot_product")
  builder = builder.tree(
      num_leaves=num_leaves,
      num_leaves_to_search=min(params.leaves_to_search, num_leaves),
      training_sample_size=min(params.training_sample_size, candidates.shape[0]),
  )
  builder = builder.score_ah(
      params.dims_per_block, anisotropic_quantization_threshold=params.anisotropic_threshold
  )
  builder = builder.reorder(max(params.reorder, k))
  return builder.build()


def scann_search(searcher, queries, k: int, *, batch_size: int = 256):
  """Searches a built ScaNN index; returns (scores [Q,k] float32, indices [Q,k] int64)."""
  queries = _as_matrix(queries, "queries")
  if queries.shape[0] == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  indices, scores = searcher.search_batched_parallel(
      queries, final_num_neighbors=k, batch_size=batch_size
  )
  return np.asarray(scores, np.float32), np.asarray(indices, np.int64)


def recall_against_exact(
    approx_indices, queries, candidates, k: int, *, num_samples: int = RECALL_SAMPLES, seed: int = 0
) -> float:
  """Recall@k of an approximate top-k list against exact search, on a sample of queries.

  Recall = |approx top-k  intersect  exact top-k| / k, averaged over ``num_samples`` queries drawn
  without replacement (all queries when there are fewer).
  """
  queries = _as_matrix(queries, "queries")
  k = min(k, np.asarray(candidates).shape[0])
  num = queries.shape[0]
  if num == 0:
    return float("nan")
  rows = np.random.default_rng(seed).choice(num, size=min(num, num_samples), replace=False)
  rows.sort()
  _, exact_indices = exact_search(queries[rows], candidates, k)
  approx = np.asarray(approx_indices)[rows, :k]
  found = [len(np.intersect1d(a, e)) for a, e in zip(approx, exact_indices)]
  return float(np.mean(found) / k)


@dataclasses.dataclass
class SearchResult:
  scores: np.ndarray  # [Q, k] float32, best first
  indices: np.ndarray  # [Q, k] int64 positions in the candidate matrix
  method: str  # 'exact' or 'scann'
  info: dict[str, Any]  # for ScaNN: its parameters, recall vs exact, build/search seconds


def search(
    queries,
    candidates,
    k: int,
    *,
    method: str = "auto",
    exact_max_candidates: int = EXACT_MAX_CANDIDATES,
    scann: Optional[dict] = None,
    recall_samples: int = RECALL_SAMPLES,
    seed: int = 0,
    query_block: int = 1024,
    candidate_block: int = 32_768,
    processes: Optional[tuple[int, int, Callable]] = None,
) -> SearchResult:
  """Top-k search choosing exact search for small pools and ScaNN for large ones.

  In a multi-process job every process holds the same queries and candidates; each searches its
  own contiguous share of the queries and the shares are gathered, so the search is done once
  across the job (not once per process) and every process returns the whole result.

  Args:
    queries, candidates: [Q, d] and [N, d] embeddings (inner-product similarity).
    k: neighbours per query (clipped to N).
    method: 'exact', 'scann', or 'auto' (ScaNN when N >= exact_max_candidates).
    scann: overrides for ``scann_params`` (e.g. ``dict(num_leaves=2000)``).
    recall_samples, seed: queries sampled to measure ScaNN's recall@k against exact search.
    processes: (process index, process count, allgather) where ``allgather(x)`` stacks every
      process's array ``x`` (same shape on all); default: this JAX job's, with
      ``multihost_utils.process_allgather``.
  """
  if method not in ("auto", "exact", "scann"):
    raise ValueError(f"search method must be 'auto', 'exact' or 'scann', got {method!r}")
  candidates = _as_matrix(candidates, "candidates")
  queries = _as_matrix(queries, "queries")
  if method == "auto":
    method = "scann" if candidates.shape[0] >= exact_max_candidates else "exact"
  index, count, allgather = processes or (jax.process_index(), jax.process_count(), _allgather)
  options = dict(
      method=method,
      scann=scann,
      recall_samples=recall_samples,
      seed=seed,
      query_block=query_block,
      candidate_block=candidate_block,
  )
  if count == 1:
    return _search_here(queries, candidates, k, **options)
  shares = np.array_split(np.arange(queries.shape[0]), count)
  mine = _search_here(queries[shares[index]], candidates, k, **options)
  return _gathered(mine, [len(share) for share in shares], allgather)


def _allgather(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return np.asarray(multihost_utils.process_allgather(x))


def _gathered(mine: SearchResult, sizes: list[int], allgather: Callable) -> SearchResult:
  """Every process's share of a search (``mine`` here; ``sizes`` queries each), in query order."""
  longest, k = max(sizes), mine.scores.shape[1]
  scores = np.full((longest, k), -np.inf, np.float32)
  indices = np.full((longest, k), -1, np.int64)
  scores[: len(mine.scores)], indices[: len(mine.indices)] = mine.scores, mine.indices
  all_scores, all_indices = allgather(scores), allgather(indices)
  info = dict(mine.info)
  if mine.method == "scann":  # recall over every process's sample, the slowest process's times
    figures = [info["recall_vs_exact"], len(mine.scores), info["build_seconds"]]
    gathered = allgather(np.array(figures + [info["search_seconds"]], np.float64))
    recalls, counts = gathered[:, 0], gathered[:, 1]
    known = np.isfinite(recalls) & (counts > 0)  # a process with no queries measured nothing
    info.update(
        recall_vs_exact=float(np.average(recalls[known], weights=counts[known]))
        if known.any()
        else float("nan"),
        build_seconds=float(gathered[:, 2].max()),
        search_seconds=float(gathered[:, 3].max()),
    )
  return SearchResult(
      np.concatenate([s[:n] for s, n in zip(all_scores, sizes)]),
      np.concatenate([i[:n] for i, n in zip(all_indices, sizes)]),
      mine.method,
      info,
  )


def _search_here(
    queries,
    candidates,
    k: int,
    *,
    method,
    scann,
    recall_samples,
    seed,
    query_block,
    candidate_block,
) -> SearchResult:
  """:func:`search` of ``queries`` in this process alone (``method`` resolved)."""
  if method == "exact":
    scores, indices = exact_search(
        queries, candidates, k, query_block=query_block, candidate_block=candidate_block
    )
    return SearchResult(scores, indices, "exact", {})
  params = scann_params(candidates.shape[0], k, **(scann or {}))
  start = time.perf_counter()
  building = progress.Progress(f"building a ScaNN index over {candidates.shape[0]} candidates")
  searcher = build_scann(candidates, k, params)
  building.finish("built the ScaNN index")
  built = time.perf_counter()
  searching = progress.Progress(f"ScaNN search of {queries.shape[0]} queries")
  scores, indices = scann_search(searcher, queries, min(k, candidates.shape[0]))
  searching.finish(f"searched {queries.shape[0]} queries with ScaNN")
  searched = time.perf_counter()
  recall = recall_against_exact(
      indices, queries, candidates, k, num_samples=recall_samples, seed=seed
  )
  info = dict(
      dataclasses.asdict(params),
      recall_vs_exact=recall,
      build_seconds=built - start,
      search_seconds=searched - built,
  )
  return SearchResult(scores, indices, "scann", info)
