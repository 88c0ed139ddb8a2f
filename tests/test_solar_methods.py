"""SOLAR stage-1 and stage-2 functions: numpy references, edge cases, sharded == single-device."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmret.methods import solar

N_DEVICES = 8


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _gaussian_pdf(x, mean, var):
  return np.exp(-((x - mean) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)


def _tokens(n=4, t=5, d=6, seed=0, empty_row=None):
  rng = np.random.default_rng(seed)
  mask = np.ones((n, t), bool)
  for b in range(n):
    mask[b, rng.integers(2, t + 1) :] = False
  if empty_row is not None:
    mask[empty_row] = False
  return (
      rng.normal(size=(n, t, d)).astype(np.float32),
      mask,
      _normalize(rng.normal(size=(n, d))).astype(np.float32),
  )


def _sharded_equals_single(fn, params, inputs, rtol=1e-5, atol=1e-7):
  """fn(params, inputs, axis_name) -> scalar: value and grad pmean'd over 8 devices vs 1 device."""
  single_value, single_grad = jax.value_and_grad(fn)(params, inputs)

  def per_device(p, x):
    value, grad = jax.value_and_grad(functools.partial(fn, axis_name="d"))(p, x)
    return jax.lax.pmean(value, "d"), jax.lax.pmean(grad, "d")

  mesh = jax.make_mesh((N_DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  mapped = jax.jit(
      jax.shard_map(
          per_device, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P()), check_vma=False
      )
  )
  value, grad = jax.block_until_ready(mapped(params, inputs))
  np.testing.assert_allclose(value, single_value, rtol=rtol)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(single_grad)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(single_grad))


# --- Global-to-local alignment --------------------------------------------------------------------


def _gla_reference(tokens, mask, partner, margin):
  tokens, partner = _normalize(np.float64(tokens)), _normalize(np.float64(partner))
  n = len(tokens)
  hinges = []
  for i in range(n):
    valid = tokens[i][mask[i]]
    if not len(valid):
      continue
    positive = np.mean(valid @ partner[i])
    negative = np.mean([valid @ partner[j] for j in range(n) if j != i])
    hinges.append(max(0.0, negative + margin - positive))
  return np.mean(hinges)


def test_gla_matches_reference_with_an_all_padding_row():
  tokens, mask, partner = _tokens(n=5, empty_row=2)
  got = solar.global_to_local_alignment(tokens, mask, partner, margin=0.3)
  np.testing.assert_allclose(got, _gla_reference(tokens, mask, partner, 0.3), rtol=1e-5)
  assert solar.global_to_local_alignment(tokens[:1], mask[:1], partner[:1]) == 0.0


def test_gla_both_directions_and_sharded_equals_single():
  rng = np.random.default_rng(1)
  text_tokens, text_mask, z_image = _tokens(n=16, seed=1, empty_row=5)
  inputs = {
      "image_tokens": rng.normal(size=(16, 4, 6)).astype(np.float32),
      "text_tokens": text_tokens,
      "text_mask": text_mask,
      "z_image": z_image,
      "z_text": _normalize(rng.normal(size=(16, 6))).astype(np.float32),
  }
  both = solar.gla_loss(**inputs, margin=0.5)
  expected = 0.5 * (
      _gla_reference(inputs["image_tokens"], np.ones((16, 4), bool), inputs["z_text"], 0.5)
      + _gla_reference(text_tokens, text_mask, z_image, 0.5)
  )
  np.testing.assert_allclose(both, expected, rtol=1e-5)

  def fn(w, x, axis_name=None):
    x = dict(
        x,
        image_tokens=x["image_tokens"] * w["a"] + x["text_tokens"][:, :4],
        z_text=x["z_text"] + w["b"] * x["z_image"],
    )
    return solar.gla_loss(**x, margin=0.5, axis_name=axis_name)

  _sharded_equals_single(fn, {"a": jnp.float32(1.2), "b": jnp.float32(0.3)}, inputs)


# --- Correlation distillation ---------------------------------------------------------------------


def test_pearson_correlation_masks_and_degenerate_rows():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
  mask = np.ones((3, 7), bool)
  mask[0, 5:] = False
  mask[1, 1:] = False  # a single entry: not a valid row
  a[2] = 1.0  # constant row: correlation 0
  corr, valid = solar.pearson_correlation(a, b, mask)
  np.testing.assert_allclose(corr[0], np.corrcoef(a[0, :5], b[0, :5])[0, 1], rtol=1e-5)
  assert list(np.asarray(valid)) == [True, False, True]
  np.testing.assert_allclose(corr[2], 0.0, atol=1e-6)


def _local_distillation_reference(teacher, student, mask):
  corrs = []
  for b in range(len(teacher)):
    idx = np.flatnonzero(mask[b])
    t = _normalize(np.float64(teacher[b][idx]))
    s = _normalize(np.float64(student[b][idx]))
    st, ss = t @ t.T, s @ s.T
    for k in range(len(idx)):
      others = [j for j in range(len(idx)) if j != k]
      if len(others) >= 2:
        corrs.append(np.corrcoef(st[k, others], ss[k, others])[0, 1])
  return 1 - np.mean(corrs)


def test_local_distillation_matches_reference_and_is_zero_for_equal_models():
  teacher, mask, _ = _tokens(n=4, t=6, seed=3, empty_row=1)
  student = teacher + 0.5 * np.random.default_rng(3).normal(size=teacher.shape).astype(np.float32)
  mask[0, :] = True
  got = solar.local_distillation(teacher, student, mask)
  np.testing.assert_allclose(got, _local_distillation_reference(teacher, student, mask), rtol=1e-5)
  np.testing.assert_allclose(solar.local_distillation(teacher, teacher, mask), 0.0, atol=1e-5)
  # The frozen teacher receives no gradient.
  grad = jax.grad(lambda t: solar.local_distillation(t, student, mask))(teacher)
  assert np.all(np.asarray(grad) == 0)


def test_global_distillation_matches_reference_and_sharded_equals_single():
  rng = np.random.default_rng(4)
  x = {k: rng.normal(size=(16, 6)).astype(np.float32) for k in ("ta", "tb", "sa", "sb")}
  got = solar.global_distillation(x["ta"], x["tb"], x["sa"], x["sb"])
  teacher = _normalize(np.float64(x["ta"])) @ _normalize(np.float64(x["tb"])).T
  student = _normalize(np.float64(x["sa"])) @ _normalize(np.float64(x["sb"])).T
  expected = 1 - np.mean([np.corrcoef(teacher[k], student[k])[0, 1] for k in range(16)])
  np.testing.assert_allclose(got, expected, rtol=1e-5)

  def fn(w, x, axis_name=None):
    return solar.global_distillation(
        x["ta"], x["tb"], x["sa"] * w, x["sb"] + w * x["sa"], axis_name=axis_name
    )

  _sharded_equals_single(fn, jnp.float32(0.7), x)


# --- Threshold and masks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mean_a,var_a,mean_b,var_b,expected",
    [
        (0.0, 1.0, 3.0, 1.0, 1.5),  # equal variances: the midpoint (linear root)
        (2.0, 0.5, -1.0, 0.5, 0.5),
        (0.0, 1.0, 0.0, 4.0, math.sqrt(8 * math.log(2) / 3)),  # equal means: the roots are +-1.3596
        (0.0, 1.0, 2.0, 4.0, None),  # checked by the density equality below
        (0.8, 0.01, 0.1, 0.04, None),
    ],
)
def test_gaussian_crossing(mean_a, var_a, mean_b, var_b, expected):
  x = float(solar.gaussian_crossing(mean_a, var_a, mean_b, var_b))
  np.testing.assert_allclose(
      _gaussian_pdf(x, mean_a, var_a), _gaussian_pdf(x, mean_b, var_b), rtol=1e-4
  )
  if expected is not None:
    np.testing.assert_allclose(abs(x) if mean_a == mean_b else x, expected, rtol=1e-5)
  if mean_a != mean_b:
    assert min(mean_a, mean_b) <= x <= max(mean_a, mean_b)


def test_gaussian_crossing_of_identical_gaussians_is_their_mean():
  np.testing.assert_allclose(solar.gaussian_crossing(0.3, 0.1, 0.3, 0.1), 0.3, rtol=1e-6)


def test_fit_threshold_recovers_crossing_and_ignores_masked_scores():
  rng = np.random.default_rng(5)
  positive = rng.normal(0.6, 0.1, size=(8, 4000)).astype(np.float32)
  negative = rng.normal(0.1, 0.2, size=(8, 4000)).astype(np.float32)
  positive_mask = np.ones_like(positive, bool)
  positive_mask[:, -100:] = False
  positive[:, -100:] = -50.0  # masked-out garbage must not move the fit
  fitted = solar.fit_threshold(positive, negative, positive_mask)
  true = solar.gaussian_crossing(0.6, 0.01, 0.1, 0.04)
  np.testing.assert_allclose(fitted, true, atol=5e-3)
  m, n = positive[positive_mask], negative.ravel()
  np.testing.assert_allclose(
      fitted, solar.gaussian_crossing(m.mean(), m.var(), n.mean(), n.var()), rtol=1e-4
  )

  def fn(w, x, axis_name=None):
    return w * solar.fit_threshold(x["p"], x["n"], x["m"], axis_name=axis_name)

  _sharded_equals_single(fn, jnp.float32(1.0), {"p": positive, "n": negative, "m": positive_mask})


def test_token_scores_and_intersection_threshold():
  tokens, mask, partner = _tokens(n=4, seed=6)
  scores = solar.token_scores(tokens, partner)
  np.testing.assert_allclose(
      scores, np.einsum("btd,bd->bt", _normalize(tokens), partner), rtol=1e-5, atol=1e-6
  )
  samples = solar.token_score_samples(tokens, mask, partner)
  positive, positive_mask, negative, negative_mask = samples
  np.testing.assert_allclose(negative[1, 0, 2], _normalize(tokens[1, 0]) @ partner[2], rtol=1e-5)
  assert not np.asarray(negative_mask)[1, 0, 1] and np.asarray(negative_mask)[1, 0, 2]
  threshold = solar.intersection_threshold(tokens, mask, partner)
  p = np.asarray(positive)[mask]
  n = np.asarray(negative)[np.asarray(negative_mask)]
  expected = solar.gaussian_crossing(p.mean(), p.var(), n.mean(), n.var())
  np.testing.assert_allclose(threshold, expected, rtol=1e-4)


def test_intersection_mask_has_no_gradient_and_zero_padding():
  scores = jnp.array([[0.9, 0.1, 0.7, 0.8]])
  token_mask = jnp.array([[True, True, True, False]])
  mask = solar.intersection_mask(scores, 0.5, token_mask)
  np.testing.assert_array_equal(mask, [[1.0, 0.0, 1.0, 0.0]])
  grad = jax.grad(lambda s: jnp.sum(solar.intersection_mask(s, 0.5) * s))(scores)
  np.testing.assert_array_equal(grad, solar.intersection_mask(scores, 0.5))  # only the explicit s


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_anneal_rho_goes_from_one_to_zero(schedule):
  rho = jax.jit(lambda s: solar.anneal_rho(s, 100, schedule=schedule))
  values = [float(rho(jnp.int32(s))) for s in (0, 25, 50, 75, 100, 1000)]
  assert values[0] == 1.0 and values[-2] == 0.0 and values[-1] == 0.0
  assert all(a > b for a, b in zip(values[:5], values[1:5]))
  np.testing.assert_allclose(values[2], 0.5, atol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    solar.anneal_rho(0, 10, schedule="step")


def test_annealed_mask():
  hard = jnp.array([[1.0, 0.0, 1.0]])
  np.testing.assert_allclose(solar.annealed_mask(hard, 1.0), [[1, 1, 1]])
  np.testing.assert_allclose(solar.annealed_mask(hard, 0.25), [[1, 0.25, 1]])
  np.testing.assert_allclose(solar.annealed_mask(hard, 0.0, jnp.array([[1, 1, 0]])), [[1, 0, 0]])


# --- Stage 2 views --------------------------------------------------------------------------------


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
  keys = solar.sample_keys(jax.random.key(0), 4)
  views = jax.jit(functools.partial(solar.masked_views, mask_ratio=0.5))(
      keys, intersection, valid, protected=protected
  )
  pos, neg = np.asarray(views["positive_keep"]), np.asarray(views["negative_keep"])
  dropped_pos, dropped_neg = valid & ~pos, valid & ~neg
  assert not (pos & ~valid).any() and not (neg & ~valid).any()
  assert dropped_pos[0].sum() == 3 and not (dropped_pos & ~intersection).any()
  assert dropped_neg[0].sum() == 1 and dropped_neg[0, 6] and not dropped_neg[0, 7]  # 7 protected
  assert not (dropped_neg & intersection).any()
  np.testing.assert_array_equal(pos[1:3], valid[1:3])  # no positive: the view is the original
  assert not neg[2].any()  # all 8 units are difference, all dropped
  np.testing.assert_array_equal(neg[3], valid[3])
  np.testing.assert_array_equal(views["has_positive"], [True, False, False, True])
  np.testing.assert_array_equal(views["has_negative"], [True, True, True, False])
  # Per-sample randomness: different samples with the same units drop different ones.
  same = np.tile(intersection[:1], (4, 1))
  many = solar.masked_views(solar.sample_keys(jax.random.key(1), 4), same, valid, mask_ratio=0.5)
  assert len({tuple(row) for row in np.asarray(many["positive_keep"])}) > 1


def test_sample_keys_do_not_depend_on_sharding():
  single = jax.random.key_data(solar.sample_keys(jax.random.key(3), 16))
  mesh = jax.make_mesh((N_DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  keys_of = lambda x: solar.sample_keys(jax.random.key(3), x.shape[0], axis_name="d")
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
          solar.patch_segments, grid_shape=(height, width), num_segments=2, position_weight=0.1
      )
  )
  ids = np.asarray(segment(features.astype(np.float32))).reshape(2, height, width)
  for sample in ids:
    assert len(set(sample[:, :2].ravel())) == 1 and len(set(sample[:, 2:].ravel())) == 1
    assert sample[0, 0] != sample[0, 5]
  with pytest.raises(ValueError, match="grid"):
    solar.patch_segments(features, (5, 5), 2)
  with pytest.raises(ValueError, match="num_segments"):
    solar.patch_segments(features, (height, width), 25)


def test_segment_scores_and_image_views_follow_segments():
  ids = np.array([[0, 0, 1, 1, 2, 2]])
  scores = np.array([[0.9, 0.7, 0.2, 0.0, 0.8, 1.0]], np.float32)
  seg, non_empty = solar.segment_scores(scores, ids, 4)
  np.testing.assert_allclose(seg, [[0.8, 0.1, 0.9, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(non_empty, [[True, True, True, False]])
  views = solar.image_views(
      solar.sample_keys(jax.random.key(0), 1), scores, ids, 4, 0.5, mask_ratio=0.5
  )
  pos, neg = np.asarray(views["positive_keep"])[0], np.asarray(views["negative_keep"])[0]
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
  views = solar.stage2_views(
      jax.random.key(0),
      text_scores,
      0.5,
      text_mask,
      patch_scores,
      0.5,
      ids,
      4,
      mode=mode,
      mask_ratio=0.5,
  )
  text_changed = ~np.asarray(views["text_positive_keep"]).all(1) | ~np.asarray(
      views["text_negative_keep"]
  ).all(1)
  image_changed = ~np.asarray(views["image_positive_keep"]).all(1) | ~np.asarray(
      views["image_negative_keep"]
  ).all(1)
  if mode == "text":
    assert text_changed.all() and not image_changed.any()
  if mode == "image":
    assert image_changed.any() and not text_changed.any()
  if mode == "random":
    assert not (text_changed & image_changed).all()
  with pytest.raises(ValueError, match="view mode"):
    solar.masked_modalities(solar.sample_keys(jax.random.key(0), 2), "none")


# --- Multi-positive InfoNCE -----------------------------------------------------------------------


def _multi_positive_reference(anchors, candidates, positives, negatives, temperature):
  out = []
  for i in range(len(anchors)):
    s = np.exp(np.float64(anchors[i]) @ np.float64(candidates).T / temperature)
    p = [j for j in range(len(candidates)) if positives[i, j]]
    pn = [j for j in range(len(candidates)) if positives[i, j] or negatives[i, j]]
    out.append(-np.log(s[p].sum() / s[pn].sum()) if p else 0.0)
  return np.array(out)


def test_multi_positive_infonce_matches_formula():
  rng = np.random.default_rng(9)
  anchors = _normalize(rng.normal(size=(4, 5))).astype(np.float32)
  candidates = _normalize(rng.normal(size=(9, 5))).astype(np.float32)
  positives = rng.uniform(size=(4, 9)) < 0.3
  positives[0, :2] = True
  positives[3] = False  # no positive: left out
  negatives = rng.uniform(size=(4, 9)) < 0.6
  loss, valid = solar.multi_positive_infonce(
      anchors, candidates, positives, negatives, temperature=0.1
  )
  np.testing.assert_allclose(
      loss,
      _multi_positive_reference(anchors, candidates, positives, negatives, 0.1),
      rtol=1e-5,
      atol=1e-6,
  )
  assert list(np.asarray(valid)) == [bool(r.any()) for r in positives]


def _stage2_reference(fa, fp, fn, has_pos, has_neg, temperature, symmetric):
  n = len(fa)
  candidates = np.concatenate([fa, fp, fn])
  valid_column = np.concatenate([np.ones(n, bool), has_pos, has_neg])
  losses = []
  for view, anchors, positive_view in ((0, fa, 1), (1, fp, 0))[: 2 if symmetric else 1]:
    for i in range(n):
      if not has_pos[i]:
        continue
      positives = np.zeros((1, 3 * n), bool)
      positives[0, positive_view * n + i] = True
      negatives = np.zeros((1, 3 * n), bool)
      for c in range(3 * n):
        sample, kind = c % n, c // n
        negatives[0, c] = valid_column[c] and (sample != i or (kind == 2 and has_neg[i]))
      losses.append(
          _multi_positive_reference(
              anchors[i : i + 1], candidates, positives, negatives, temperature
          )[0]
      )
  return np.mean(losses)


def _stage2_inputs():
  rng = np.random.default_rng(10)
  x = {k: _normalize(rng.normal(size=(16, 6))).astype(np.float32) for k in ("fa", "fp", "fn")}
  x["has_pos"] = rng.uniform(size=16) < 0.8
  x["has_neg"] = rng.uniform(size=16) < 0.7
  return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_stage2_contrastive_loss_matches_reference(symmetric):
  x = _stage2_inputs()
  got = solar.stage2_contrastive_loss(
      x["fa"], x["fp"], x["fn"], x["has_pos"], x["has_neg"], temperature=0.1, symmetric=symmetric
  )
  np.testing.assert_allclose(
      got,
      _stage2_reference(x["fa"], x["fp"], x["fn"], x["has_pos"], x["has_neg"], 0.1, symmetric),
      rtol=1e-5,
  )


def test_stage2_contrastive_loss_sharded_equals_single():
  def fn(w, x, axis_name=None):
    fp = solar.l2_normalize(x["fp"] + w * x["fa"])
    return solar.stage2_contrastive_loss(
        x["fa"], fp, x["fn"] * w, x["has_pos"], x["has_neg"], temperature=0.1, axis_name=axis_name
    )

  _sharded_equals_single(fn, jnp.float32(0.5), _stage2_inputs())


def test_stage2_contrastive_loss_without_any_positive_is_zero():
  f = _normalize(np.random.default_rng(11).normal(size=(3, 4))).astype(np.float32)
  none = np.zeros(3, bool)
  assert float(solar.stage2_contrastive_loss(f, f, f, none, none)) == 0.0
