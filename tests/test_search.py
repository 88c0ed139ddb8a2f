"""Exact blocked search against a dense brute force; ScaNN parameters, search and recall."""

import threading

import numpy as np
import pytest

from mmret.evals import metrics
from mmret.evals import search


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("query_block,candidate_block", [(7, 13), (64, 1000), (1, 5)])
def test_exact_search_matches_dense_ranking(query_block, candidate_block):
  rng = np.random.default_rng(0)
  queries, candidates = _unit(rng, 23, 8), _unit(rng, 101, 8)
  scores, indices = search.exact_search(
      queries, candidates, 10, query_block=query_block, candidate_block=candidate_block
  )
  dense = queries @ candidates.T
  np.testing.assert_array_equal(indices, metrics.rank_from_scores(dense, 10))
  np.testing.assert_allclose(scores, np.take_along_axis(dense, indices, 1), rtol=1e-5, atol=1e-6)
  assert indices.dtype == np.int64 and scores.shape == (23, 10)


def test_exact_search_ties_follow_candidate_order_across_blocks():
  # Every candidate scores the same: ranking must be 0, 1, 2, ... whatever the blocking.
  queries = np.ones((3, 4), np.float32)
  candidates = np.ones((50, 4), np.float32)
  _, indices = search.exact_search(queries, candidates, 12, query_block=2, candidate_block=7)
  np.testing.assert_array_equal(indices, np.tile(np.arange(12), (3, 1)))
  # Integer-valued scores with many ties agree with the stable dense ranking.
  rng = np.random.default_rng(1)
  queries = rng.integers(0, 2, size=(9, 3)).astype(np.float32)
  candidates = rng.integers(0, 2, size=(40, 3)).astype(np.float32)
  _, indices = search.exact_search(queries, candidates, 15, candidate_block=6)
  np.testing.assert_array_equal(indices, metrics.rank_from_scores(queries @ candidates.T, 15))


def test_exact_search_clips_k_and_checks_shapes():
  rng = np.random.default_rng(0)
  scores, indices = search.exact_search(_unit(rng, 2, 4), _unit(rng, 3, 4), 10)
  assert indices.shape == (2, 3) and sorted(indices[0]) == [0, 1, 2]
  with pytest.raises(ValueError, match="width"):
    search.exact_search(_unit(rng, 2, 4), _unit(rng, 3, 5), 2)


def test_scann_params_follow_pool_size_and_overrides():
  params = search.scann_params(1_000_000, k=10)
  assert params.num_leaves == 1000
  assert params.leaves_to_search == 100
  assert params.reorder == 100
  assert search.scann_params(10_000).num_leaves == 100
  assert search.scann_params(10_000, num_leaves=7, leaves_to_search=3).leaves_to_search == 3
  with pytest.raises(ValueError, match="unknown ScaNN parameters"):
    search.scann_params(100, num_leafs=3)


def test_scann_search_reports_recall_against_exact():
  rng = np.random.default_rng(0)
  # Clustered data: queries near pool points, as in retrieval.
  centres = _unit(rng, 50, 32)
  candidates = centres[rng.integers(0, 50, 6000)] + 0.3 * rng.normal(size=(6000, 32))
  candidates = (candidates / np.linalg.norm(candidates, axis=1, keepdims=True)).astype(np.float32)
  queries = candidates[:200] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
  result = search.search(
      queries, candidates, 10, method="auto", exact_max_candidates=5000, recall_samples=100
  )
  assert result.method == "scann"
  assert result.indices.shape == (200, 10)
  assert 0.6 <= result.info["recall_vs_exact"] <= 1.0  # ~0.9 typically; random ids ~0.002
  # The reported recall is the overlap with exact search on the sampled queries.
  recall = search.recall_against_exact(result.indices, queries, candidates, 10, num_samples=200)
  _, exact = search.exact_search(queries, candidates, 10)
  overlap = np.mean([len(np.intersect1d(a, e)) for a, e in zip(result.indices, exact)]) / 10
  assert recall == pytest.approx(overlap)
  # Small pools go to exact search by default.
  small = search.search(queries, candidates[:500], 5)
  assert small.method == "exact" and small.info == {}


def test_search_rejects_unknown_method():
  with pytest.raises(ValueError, match="search method"):
    search.search(np.ones((1, 2)), np.ones((3, 2)), 1, method="faiss")


def _as_processes(count, run):
  """Runs ``run(processes)`` in ``count`` threads standing in for the processes of a job, each
  with its (index, count, allgather) triple; returns every process's result."""
  barrier = threading.Barrier(count)
  slots, results = [None] * count, [None] * count

  def worker(index):
    def allgather(x):
      slots[index] = np.asarray(x)
      barrier.wait()
      stacked = np.stack(slots)
      barrier.wait()  # nobody overwrites a slot before every process has read them all
      return stacked

    results[index] = run((index, count, allgather))

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return results


@pytest.mark.parametrize("count,num_queries", [(3, 50), (4, 2)])
def test_processes_split_the_queries_and_each_gets_the_whole_search(count, num_queries):
  rng = np.random.default_rng(1)
  candidates = _unit(rng, 300, 16)
  queries = _unit(rng, num_queries, 16)
  one = search.search(queries, candidates, 7, method="exact")
  results = _as_processes(
      count, lambda p: search.search(queries, candidates, 7, method="exact", processes=p)
  )
  for result in results:  # (4, 2): two processes have no query at all
    np.testing.assert_array_equal(result.indices, one.indices)
    np.testing.assert_allclose(result.scores, one.scores, rtol=1e-6)  # other matmul shapes


def test_each_process_searches_only_its_share(monkeypatch):
  rng = np.random.default_rng(2)
  candidates, queries = _unit(rng, 200, 8), _unit(rng, 40, 8)
  searched = []
  original = search.exact_search

  def recording(q, c, k, **kwargs):
    searched.append(len(q))
    return original(q, c, k, **kwargs)

  monkeypatch.setattr(search, "exact_search", recording)
  _as_processes(4, lambda p: search.search(queries, candidates, 5, method="exact", processes=p))
  assert sorted(searched) == [10, 10, 10, 10]  # 40 queries searched once in all, not 4 x 40


def test_scann_over_processes_reports_the_recall_of_all_samples():
  rng = np.random.default_rng(3)
  centres = _unit(rng, 40, 16)
  candidates = centres[rng.integers(0, 40, 3000)] + 0.3 * rng.normal(size=(3000, 16))
  candidates = (candidates / np.linalg.norm(candidates, axis=1, keepdims=True)).astype(np.float32)
  queries = candidates[:90] + 0.05 * rng.normal(size=(90, 16)).astype(np.float32)
  results = _as_processes(
      3, lambda p: search.search(queries, candidates, 10, method="scann", processes=p)
  )
  first = results[0]
  assert first.indices.shape == (90, 10) and first.method == "scann"
  for other in results[1:]:
    np.testing.assert_array_equal(other.indices, first.indices)
    assert other.info == first.info
  # The reported recall is the overlap with exact search over every process's queries.
  _, exact = search.exact_search(queries, candidates, 10)
  overlap = np.mean([len(np.intersect1d(a, e)) for a, e in zip(first.indices, exact)]) / 10
  assert first.info["recall_vs_exact"] == pytest.approx(overlap)
