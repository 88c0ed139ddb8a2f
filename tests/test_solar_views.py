"""SOLAR stage 2's views and patch segments: which units each view drops, per-sample randomness
that does not depend on the device split, k-means segments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmret import methods
from mmret.recipes.solar import segments, views


def test_masked_views_drop_only_the_right_units():
  valid = np.ones((4, 10), bool)
  valid[:, 8:] = False
  intersection = np.zeros((4, 10), bool)
  intersection[0, :6] = True  # 6 shared, 2 difference
  intersection[1, :1] = True  # a single shared unit is never dropped
  intersection[3, :8] = True  # no difference units
  # sample 2 has no intersection units at all
  protected = np.zeros((4, 10), bool)
  protected[0, 7] = True
  keys = methods.example_keys(jax.random.key(0), 4)
  built = jax.jit(functools.partial(views.masked_views, mask_ratio=0.5))(
      keys, intersection, valid, protected=protected
  )
  pos, neg = np.asarray(built["positive_keep"]), np.asarray(built["negative_keep"])
  dropped_pos, dropped_neg = valid & ~pos, valid & ~neg
  assert not (pos & ~valid).any() and not (neg & ~valid).any()
  assert dropped_pos[0].sum() == 3 and not (dropped_pos & ~intersection).any()
  assert dropped_neg[0].sum() == 1 and dropped_neg[0, 6] and not dropped_neg[0, 7]  # 7 protected
  assert not (dropped_neg & intersection).any()
  np.testing.assert_array_equal(pos[1:3], valid[1:3])  # no positive: the view is the original
  assert not neg[2].any()  # all 8 units are difference, all dropped
  np.testing.assert_array_equal(neg[3], valid[3])
  np.testing.assert_array_equal(built["has_positive"], [True, False, False, True])
  np.testing.assert_array_equal(built["has_negative"], [True, True, True, False])
  # Per-sample randomness: different samples with the same units drop different ones.
  same = np.tile(intersection[:1], (4, 1))
  many = views.masked_views(methods.example_keys(jax.random.key(1), 4), same, valid, mask_ratio=0.5)
  assert len({tuple(row) for row in np.asarray(many["positive_keep"])}) > 1


def test_example_keys_do_not_depend_on_sharding():
  single = jax.random.key_data(methods.example_keys(jax.random.key(3), 16))
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  keys_of = lambda x: methods.example_keys(jax.random.key(3), x.shape[0], axis_name="d")
  mapped = jax.jit(
      jax.shard_map(
          lambda x: jax.random.key_data(keys_of(x)),
          mesh=mesh,
          in_specs=P("d"),
          out_specs=P("d"),
          check_vma=False,
      )
  )
  np.testing.assert_array_equal(jax.block_until_ready(mapped(jnp.zeros(16))), single)


def test_patch_segments_separate_two_regions():
  rng = np.random.default_rng(7)
  height, width, d = 4, 6, 8
  a, b = rng.normal(size=d), rng.normal(size=d)
  grid = np.where((np.arange(width) < 2)[None, :, None], a, b)  # left two columns differ
  features = np.broadcast_to(grid, (height, width, d)).reshape(1, height * width, d)
  features = features + 0.01 * rng.normal(size=(2, height * width, d))
  segment = jax.jit(
      functools.partial(
          segments.patch_segments, grid_shape=(height, width), num_segments=2, position_weight=0.1
      )
  )
  ids = np.asarray(segment(features.astype(np.float32))).reshape(2, height, width)
  for sample in ids:
    assert len(set(sample[:, :2].ravel())) == 1 and len(set(sample[:, 2:].ravel())) == 1
    assert sample[0, 0] != sample[0, 5]
  with pytest.raises(ValueError, match="grid"):
    segments.patch_segments(features, (5, 5), 2)
  with pytest.raises(ValueError, match="num_segments"):
    segments.patch_segments(features, (height, width), 25)


def test_segment_scores_and_image_views_follow_segments():
  ids = np.array([[0, 0, 1, 1, 2, 2]])
  scores = np.array([[0.9, 0.7, 0.2, 0.0, 0.8, 1.0]], np.float32)
  seg, non_empty = segments.segment_scores(scores, ids, 4)
  np.testing.assert_allclose(seg, [[0.8, 0.1, 0.9, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(non_empty, [[True, True, True, False]])
  image = views.image_views(
      methods.example_keys(jax.random.key(0), 1), scores, ids, 4, 0.5, mask_ratio=0.5
  )
  pos, neg = np.asarray(image["positive_keep"])[0], np.asarray(image["negative_keep"])[0]
  # One of the two high-scoring segments (0 or 2) is dropped whole; the negative drops the low one.
  assert list(pos) in (
      [False, False, True, True, True, True],
      [True, True, True, True, False, False],
  )
  assert list(neg) == [True, True, False, False, True, True]


@pytest.mark.parametrize("mode", ["text", "image", "both", "random"])
def test_stage2_views_modes(mode):
  rng = np.random.default_rng(8)
  text_scores = rng.uniform(size=(6, 8)).astype(np.float32)
  text_mask = np.ones((6, 8), bool)
  patch_scores = rng.uniform(size=(6, 4)).astype(np.float32)
  ids = np.tile(np.arange(4), (6, 1))
  built = views.stage2_views(
      methods.example_keys(jax.random.key(0), 6),
      text_scores > 0.5,
      text_mask,
      patch_scores,
      0.5,
      ids,
      4,
      mode=mode,
      mask_ratio=0.5,
  )
  text_changed = ~np.asarray(built["text_positive_keep"]).all(1) | ~np.asarray(
      built["text_negative_keep"]
  ).all(1)
  image_changed = ~np.asarray(built["image_positive_keep"]).all(1) | ~np.asarray(
      built["image_negative_keep"]
  ).all(1)
  if mode == "text":
    assert text_changed.all() and not image_changed.any()
  if mode == "image":
    assert image_changed.any() and not text_changed.any()
  if mode == "random":
    assert not (text_changed & image_changed).all()
  with pytest.raises(ValueError, match="view mode"):
    views.masked_modalities(methods.example_keys(jax.random.key(0), 2), "none")


def test_fact_negatives_drop_one_run_or_one_unit():
  """'run': one whole maximal run of consecutive difference units (a phrase), chosen per sample;
  'one': exactly one difference unit (a segment). Intersection and padding are never dropped."""
  valid = np.ones((64, 10), bool)
  valid[:, 9] = False
  intersection = np.zeros((64, 10), bool)
  intersection[:, [0, 3, 4, 8]] = True  # difference runs: {1, 2}, {5, 6, 7}
  intersection[63] = True  # no difference unit: no negative
  keys = methods.example_keys(jax.random.key(2), 64)
  run = views.masked_views(keys, intersection, valid, negative_grouping="run")
  dropped = valid & ~np.asarray(run["negative_keep"])
  runs = {(1, 2), (5, 6, 7)}
  for row in dropped[:63]:
    assert tuple(np.flatnonzero(row)) in runs
  assert {tuple(np.flatnonzero(row)) for row in dropped[:63]} == runs  # both runs get chosen
  assert not dropped[63].any()
  np.testing.assert_array_equal(run["has_negative"], np.arange(64) < 63)
  one = views.masked_views(keys, intersection, valid, negative_grouping="one")
  dropped = valid & ~np.asarray(one["negative_keep"])
  assert (dropped[:63].sum(-1) == 1).all() and not (dropped & intersection).any()
  assert set(np.flatnonzero(dropped[:63].any(0))) == {1, 2, 5, 6, 7}
  # The positive views do not depend on the negative's grouping.
  ratio = views.masked_views(keys, intersection, valid)
  np.testing.assert_array_equal(run["positive_keep"], ratio["positive_keep"])
  with pytest.raises(ValueError, match="grouping"):
    views.masked_views(keys, intersection, valid, negative_grouping="phrase")


def test_stage2_views_fact_negatives_per_modality():
  """text_negative='fact' drops one phrase of the caption; image_negative='fact' one segment."""
  n = 8
  keys = methods.example_keys(jax.random.key(4), n)
  text_mask = np.ones((n, 8), bool)
  text_intersection = np.zeros((n, 8), bool)
  text_intersection[:, [0, 1, 4]] = True  # difference runs {2, 3} and {5, 6, 7}
  segment_ids = np.repeat(np.arange(4), 4)[None].repeat(n, 0)  # 4 segments of 4 patches
  patch_scores = np.where(segment_ids == 0, 1.0, -1.0).astype(np.float32)  # segment 0 shared
  built = views.stage2_views(
      keys,
      text_intersection,
      text_mask,
      patch_scores,
      0.0,
      segment_ids,
      4,
      mode="both",
      text_negative="fact",
      image_negative="fact",
  )
  text_dropped = text_mask & ~np.asarray(built["text_negative_keep"])
  for row in text_dropped:
    assert tuple(np.flatnonzero(row)) in {(2, 3), (5, 6, 7)}
  image_dropped = ~np.asarray(built["image_negative_keep"])
  for row, ids in zip(image_dropped, segment_ids):
    dropped_segments = set(ids[row])
    assert len(dropped_segments) == 1 and 0 not in dropped_segments
    assert row.sum() == 4
  ratio = views.stage2_views(
      keys, text_intersection, text_mask, patch_scores, 0.0, segment_ids, 4, mode="both"
  )
  assert (~np.asarray(ratio["image_negative_keep"])).sum(-1).tolist() == [12] * n  # all 3 dropped
  with pytest.raises(ValueError, match="text_negative"):
    views.stage2_views(
        keys, text_intersection, text_mask, patch_scores, 0.0, segment_ids, 4, text_negative="x"
    )


def _ward_reference(points, adjacency, num_segments):
  """Grid-constrained Ward clustering written from its definition (float64, plain loops)."""
  clusters = [[p] for p in range(len(points))]
  while len(clusters) > num_segments:
    best = None
    for i in range(len(clusters)):
      for j in range(i + 1, len(clusters)):
        if not any(adjacency[a, b] for a in clusters[i] for b in clusters[j]):
          continue
        a, b = points[clusters[i]], points[clusters[j]]
        cost = len(a) * len(b) / (len(a) + len(b)) * np.sum((a.mean(0) - b.mean(0)) ** 2)
        if best is None or cost < best[0] - 1e-9:
          best = (cost, i, j)
    _, i, j = best
    clusters[i] = clusters[i] + clusters.pop(j)
  labels = np.zeros(len(points), int)
  for k, members in enumerate(sorted(clusters, key=min)):
    labels[members] = k
  return labels


def test_agglomerative_segments_match_a_ward_reference():
  rng = np.random.default_rng(8)
  height, width, d = 4, 4, 6
  features = rng.normal(size=(3, height * width, d)).astype(np.float32)
  features[:, :8] += 3.0 * rng.normal(size=(1, 1, d)).astype(np.float32)  # top half alike
  ids = np.asarray(
      segments.patch_segments(
          features, (height, width), 4, method="agglomerative", position_weight=0.5
      )
  )
  rows, cols = np.divmod(np.arange(height * width), width)
  position = np.stack([rows / (height - 1), cols / (width - 1)], -1)
  adjacency = (np.abs(rows[:, None] - rows) + np.abs(cols[:, None] - cols)) == 1
  for sample, got in zip(features, ids):
    unit = sample / np.linalg.norm(sample, axis=-1, keepdims=True)
    points = np.concatenate([unit, 0.5 * position], -1).astype(np.float64)
    np.testing.assert_array_equal(got, _ward_reference(points, adjacency, 4))
    assert sorted(set(got)) == [0, 1, 2, 3]
    for k in range(4):  # every segment is connected on the grid
      members = set(np.flatnonzero(got == k))
      reached, frontier = set(), [min(members)]
      while frontier:
        p = frontier.pop()
        reached.add(p)
        frontier += [q for q in np.flatnonzero(adjacency[p]) if q in members and q not in reached]
      assert reached == members
