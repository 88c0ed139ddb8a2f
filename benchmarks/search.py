"""ScaNN against exact search: build time, queries per second and recall@k.

  python benchmarks/search.py --sizes 100000 --data random clustered
  python benchmarks/search.py --sizes 100000 1000000 --dim 256 --queries 1000

Data are unit vectors: 'random' (isotropic Gaussian, no structure: the hard case for partitioning)
or 'clustered' (Gaussian blobs around random centres, closer to learned embeddings). Queries come
from the same distribution as the pool. Exact search (``mmret.evals.search.exact_search``) gives
the ground truth; ScaNN uses ``scann_params`` derived from the pool size unless overridden.
Memory is about 2 x N x dim x 4 bytes (pool + ScaNN's re-ordering copy): 2 GB at 1M x 256.
"""

import argparse
import json
import time

import numpy as np

from mmret.evals import search


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(
    kind: str,
    num: int,
    dim: int,
    rng: np.random.Generator,
    *,
    num_clusters: int,
    spread: float,
    centres=None,
    chunk: int = 100_000,
):
  """``num`` unit vectors of ``kind``, generated in chunks to bound temporary memory."""
  out = np.empty((num, dim), np.float32)
  for start in range(0, num, chunk):
    size = min(chunk, num - start)
    noise = rng.standard_normal((size, dim), dtype=np.float32)
    if kind == "random":
      out[start : start + size] = _unit(noise)
    elif kind == "clustered":
      members = centres[rng.integers(0, num_clusters, size)]
      out[start : start + size] = _unit(members + spread / np.sqrt(dim) * noise)
    else:
      raise ValueError(f"unknown data kind {kind!r}; use 'random' or 'clustered'")
  return out


def run_one(kind: str, size: int, args) -> dict:
  rng = np.random.default_rng(args.seed)
  centres = _unit(rng.standard_normal((args.num_clusters, args.dim), dtype=np.float32))
  data_args = dict(num_clusters=args.num_clusters, spread=args.spread, centres=centres)
  pool = make_data(kind, size, args.dim, rng, **data_args)
  queries = make_data(kind, args.queries, args.dim, rng, **data_args)

  search.exact_search(queries[:8], pool, args.k)  # compile outside the timing
  start = time.perf_counter()
  _, exact = search.exact_search(queries, pool, args.k)
  exact_seconds = time.perf_counter() - start

  overrides = dict(
      num_leaves=args.num_leaves, leaves_to_search=args.leaves_to_search, reorder=args.reorder
  )
  params = search.scann_params(size, args.k, **overrides)
  start = time.perf_counter()
  searcher = search.build_scann(pool, args.k, params)
  build_seconds = time.perf_counter() - start
  search.scann_search(searcher, queries[:8], args.k)  # warm-up
  start = time.perf_counter()
  _, approx = search.scann_search(searcher, queries, args.k)
  scann_seconds = time.perf_counter() - start
  recall = np.mean([len(np.intersect1d(a, e)) for a, e in zip(approx, exact)]) / args.k
  return dict(
      data=kind,
      candidates=size,
      dim=args.dim,
      queries=args.queries,
      k=args.k,
      num_leaves=params.num_leaves,
      leaves_to_search=params.leaves_to_search,
      reorder=params.reorder,
      build_s=round(build_seconds, 2),
      scann_qps=round(args.queries / scann_seconds, 1),
      exact_qps=round(args.queries / exact_seconds, 1),
      recall_at_k=round(float(recall), 4),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--sizes",
      type=int,
      nargs="+",
      default=[100_000, 1_000_000],
      help="pool sizes (number of candidates)",
  )
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument(
      "--data", nargs="+", default=["random", "clustered"], choices=["random", "clustered"]
  )
  parser.add_argument("--num-clusters", type=int, default=1000)
  parser.add_argument(
      "--spread",
      type=float,
      default=1.0,
      help="clustered data: noise norm relative to the unit centres",
  )
  parser.add_argument("--num-leaves", type=int, default=None, help="default ~sqrt(N)")
  parser.add_argument("--leaves-to-search", type=int, default=None)
  parser.add_argument("--reorder", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, help="also write the results to this file")
  args = parser.parse_args()

  results = []
  header = (
      "data",
      "candidates",
      "num_leaves",
      "leaves_to_search",
      "reorder",
      "build_s",
      "scann_qps",
      "exact_qps",
      "recall_at_k",
  )
  print(" | ".join(header))
  for size in args.sizes:
    for kind in args.data:
      result = run_one(kind, size, args)
      results.append(result)
      print(" | ".join(str(result[h]) for h in header), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
