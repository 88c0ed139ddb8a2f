"""Grouping image patches into segments (SOLAR stage 2 masks whole segments, not single patches).

The paper groups patches by hierarchical clustering of the adapted patch features; here they are
grouped by k-means on the features plus grid position (SLIC-like), with static shapes.
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


def patch_segments(patch_features, grid_shape, num_segments, *, iterations=5, position_weight=1.0):
  """Groups patches into ``num_segments`` segments: k-means on features + grid position (SLIC-like).

  Each patch is described by its L2-normalised feature and its (row, col) scaled to [0, 1] times
  ``position_weight`` (larger: more compact segments). Centres start at patches spread over the grid
  and follow ``iterations`` rounds of nearest-centre assignment and mean update (an empty segment
  keeps its centre). Static shapes, no gradient. Returns int32 segment ids [B,P].
  """
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
