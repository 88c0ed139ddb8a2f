"""Grouping image patches into segments (SOLAR stage 2 masks whole segments, not single patches).

The paper groups patches by hierarchical clustering of the adapted patch features
(``method='agglomerative'``: Ward merges of grid-adjacent clusters); ``method='kmeans'`` groups them
by k-means on the features plus grid position (SLIC-like). Both have static shapes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmret.ops import l2_normalize


def _grid_seeds(grid_shape, num_segments):
  """Flat patch indices of ``num_segments`` seeds spread over the patch grid (cell centres)."""
  height, width = grid_shape
  rows = max(1, min(height, round(math.sqrt(num_segments * height / width))))
  cols = max(1, min(width, math.ceil(num_segments / rows)))
  while rows * cols < num_segments:
    rows, cols = min(height, rows + 1), min(width, cols + 1)
  centres = [
      (int((r + 0.5) * height / rows), int((c + 0.5) * width / cols))
      for r in range(rows)
      for c in range(cols)
  ]
  pick = np.linspace(0, len(centres) - 1, num_segments).round().astype(int)
  return np.array([centres[i][0] * width + centres[i][1] for i in pick])


METHODS = ("kmeans", "agglomerative")


def _grid_adjacency(grid_shape):
  """[P,P] bool: patches sharing an edge on the grid."""
  height, width = grid_shape
  rows, cols = np.divmod(np.arange(height * width), width)
  distance = np.abs(rows[:, None] - rows[None, :]) + np.abs(cols[:, None] - cols[None, :])
  return distance == 1


def agglomerative(points, adjacency, num_segments):
  """Ward agglomerative clustering of one image's patches [P,D] down to ``num_segments`` clusters,
  merging only clusters that touch on the grid (``adjacency`` [P,P]).

  Starts from one cluster per patch; each of the P - S merges joins the touching pair whose merge
  least increases the within-cluster sum of squares, n_a n_b / (n_a + n_b) ||mean_a - mean_b||^2
  (ties: the lowest flat index). Returns int32 ids in [0, S) [P], numbered by first patch.
  """
  n = points.shape[0]
  eye = jnp.eye(n, dtype=bool)

  def merge(_, carry):
    labels, sums, counts, active, touching = carry
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    distance = jnp.sum((means[:, None] - means[None, :]) ** 2, -1)
    cost = counts[:, None] * counts[None, :] / jnp.maximum(counts[:, None] + counts[None, :], 1.0)
    allowed = touching & active[:, None] & active[None, :] & ~eye
    flat = jnp.argmin(jnp.where(allowed, cost * distance, jnp.inf).reshape(-1))
    a, b = jnp.minimum(flat // n, flat % n), jnp.maximum(flat // n, flat % n)  # b joins a
    labels = jnp.where(labels == b, a, labels)
    sums = sums.at[a].add(sums[b]).at[b].set(0.0)
    counts = counts.at[a].add(counts[b]).at[b].set(0.0)
    active = active.at[b].set(False)
    row = touching[a] | touching[b]
    touching = touching.at[a].set(row).at[:, a].set(row)
    touching = touching.at[b].set(False).at[:, b].set(False)
    return labels, sums, counts, active, touching

  start = (
      jnp.arange(n),
      points,
      jnp.ones((n,), points.dtype),
      jnp.ones((n,), bool),
      jnp.asarray(adjacency),
  )
  labels, _, _, active, _ = jax.lax.fori_loop(0, n - num_segments, merge, start)
  return (jnp.cumsum(active) - 1)[labels].astype(jnp.int32)


def patch_segments(
    patch_features,
    grid_shape,
    num_segments,
    *,
    iterations=5,
    position_weight=1.0,
    method="kmeans",
):
  """Groups patches into ``num_segments`` segments of similar features, compact on the grid.

  Each patch is described by its L2-normalised feature and its (row, col) scaled to [0, 1] times
  ``position_weight`` (larger: more compact segments). ``method`` 'kmeans': centres start at
  patches spread over the grid and follow ``iterations`` rounds of nearest-centre assignment and
  mean update (an empty segment keeps its centre). 'agglomerative': :func:`agglomerative` (Ward,
  grid-adjacent merges; ``iterations`` unused). Static shapes, no gradient. Returns int32 segment
  ids [B,P].
  """
  if method not in METHODS:
    raise ValueError(f"unknown segment method {method!r}; expected one of {METHODS}")
  batch, n_patches, _ = patch_features.shape
  height, width = grid_shape
  if height * width != n_patches:
    raise ValueError(f"patch grid {grid_shape} does not hold the {n_patches} patches")
  if not 1 <= num_segments <= n_patches:
    raise ValueError(f"num_segments={num_segments} must be in [1, {n_patches}]")
  rows, cols = np.divmod(np.arange(n_patches), width)
  position = np.stack([rows / max(height - 1, 1), cols / max(width - 1, 1)], -1)
  features = l2_normalize(jax.lax.stop_gradient(patch_features).astype(jnp.float32))
  points = jnp.concatenate(
      [features, jnp.broadcast_to(position_weight * position, (batch, n_patches, 2))], -1
  )
  if method == "agglomerative":
    adjacency = _grid_adjacency(grid_shape)
    return jax.vmap(lambda p: agglomerative(p, adjacency, num_segments))(points)
  centres = points[:, _grid_seeds(grid_shape, num_segments)]  # [B,S,D]

  def assign(centres):
    distance = (
        jnp.sum(points**2, -1)[:, :, None]
        - 2 * jnp.einsum("bpd,bsd->bps", points, centres)
        + jnp.sum(centres**2, -1)[:, None, :]
    )
    return jnp.argmin(distance, axis=-1)

  for _ in range(iterations):
    members = jax.nn.one_hot(assign(centres), num_segments)  # [B,P,S]
    counts = jnp.sum(members, 1)[..., None]
    means = jnp.einsum("bps,bpd->bsd", members, points) / jnp.maximum(counts, 1.0)
    centres = jnp.where(counts > 0, means, centres)
  return assign(centres).astype(jnp.int32)


def segment_scores(patch_scores, segment_ids, num_segments):
  """Mean patch score per segment: ([B,P], [B,P]) -> (scores [B,S], non-empty [B,S])."""
  members = jax.nn.one_hot(segment_ids, num_segments)
  counts = jnp.sum(members, 1)
  scores = jnp.einsum("bps,bp->bs", members, patch_scores) / jnp.maximum(counts, 1.0)
  return scores, counts > 0
