"""SOLAR's masks: the density-crossing threshold and fit_masks against numpy references, annealing,
random masks, ground-truth patch labels and mask quality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import solar_reference as ref
from sharding import assert_sharded_equals_single

from mmret import methods
from mmret.recipes.solar import masks


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
  x = float(masks.gaussian_crossing(mean_a, var_a, mean_b, var_b))
  np.testing.assert_allclose(
      ref.gaussian_pdf(x, mean_a, var_a), ref.gaussian_pdf(x, mean_b, var_b), rtol=1e-4
  )
  if expected is not None:
    np.testing.assert_allclose(abs(x) if mean_a == mean_b else x, expected, rtol=1e-5)
  if mean_a != mean_b:
    assert min(mean_a, mean_b) <= x <= max(mean_a, mean_b)
    np.testing.assert_allclose(x, ref.gaussian_crossing(mean_a, var_a, mean_b, var_b), rtol=1e-5)


def test_gaussian_crossing_of_identical_gaussians_is_their_mean():
  np.testing.assert_allclose(masks.gaussian_crossing(0.3, 0.1, 0.3, 0.1), 0.3, rtol=1e-6)


def test_fit_threshold_recovers_crossing_and_ignores_masked_scores():
  rng = np.random.default_rng(5)
  positive = rng.normal(0.6, 0.1, size=(8, 4000)).astype(np.float32)
  negative = rng.normal(0.1, 0.2, size=(8, 4000)).astype(np.float32)
  positive_mask = np.ones_like(positive, bool)
  positive_mask[:, -100:] = False
  positive[:, -100:] = -50.0  # masked-out garbage must not move the fit
  fitted = masks.fit_threshold(positive, negative, positive_mask)
  np.testing.assert_allclose(fitted, ref.gaussian_crossing(0.6, 0.01, 0.1, 0.04), atol=5e-3)
  m, n = positive[positive_mask], negative.ravel()
  np.testing.assert_allclose(
      fitted, ref.gaussian_crossing(m.mean(), m.var(), n.mean(), n.var()), rtol=1e-4
  )

  def fn(w, x, axis_name=None):
    return w * masks.fit_threshold(x["p"], x["n"], x["m"], axis_name=axis_name)

  assert_sharded_equals_single(
      fn, jnp.float32(1.0), {"p": positive, "n": negative, "m": positive_mask}
  )


def test_weighted_gaussian_crossing_equalises_the_weighted_densities():
  x = float(masks.gaussian_crossing(2.0, 0.5, 0.0, 1.0, weight_a=0.2, weight_b=0.8))
  np.testing.assert_allclose(
      0.2 * ref.gaussian_pdf(x, 2.0, 0.5), 0.8 * ref.gaussian_pdf(x, 0.0, 1.0), rtol=1e-4
  )
  assert x > float(masks.gaussian_crossing(2.0, 0.5, 0.0, 1.0))  # a rarer class needs more evidence


def _mixture_scores(shift, n=32, units=24, base=0.34, separation=3.0, seed=0):
  """Positive-pair scores: ``base`` of them intersection N(separation,1), the rest N(shift,1);
  negative-pair scores N(0,1)."""
  rng = np.random.default_rng(seed)
  truth = rng.random((n, units)) < base
  positive = np.where(
      truth, rng.normal(separation, 1, truth.shape), rng.normal(shift, 1, truth.shape)
  )
  negative = rng.normal(0.0, 1.0, (n, units, n - 1))
  return positive.astype(np.float32), negative.astype(np.float32), truth


def test_mixture_threshold_matches_the_float64_em_reference():
  positive, negative, _ = _mixture_scores(shift=0.5)
  threshold, fitted = masks.fit_mixture_threshold(positive, negative)
  want, mean_1, var_1, weight = ref.mixture_em(positive, negative)
  np.testing.assert_allclose(
      [fitted["mean"], fitted["variance"], fitted["weight"]], [mean_1, var_1, weight], rtol=2e-4
  )
  np.testing.assert_allclose(threshold, want, rtol=1e-3)


@pytest.mark.parametrize("shift,min_precision,min_gain", [(0.0, 0.8, 0.05), (1.0, 0.55, 0.1)])
def test_mixture_threshold_finds_the_intersection_where_the_pair_threshold_does_not(
    shift, min_precision, min_gain
):
  """Known mixtures at the world's text proportions (31 % intersection here, 3 std above the
  negatives): the mixture's threshold keeps most intersection units at a precision near the Bayes
  rule's (0.88 / 0.91 at shift 0; 0.77 / 0.77 at shift 1), while the pairs threshold lets many more
  difference units in, the more so when they lean towards their own partner (``shift`` 1 std)."""
  positive, negative, truth = _mixture_scores(shift=shift)
  threshold, fitted = masks.fit_mixture_threshold(positive, negative)
  if shift == 0.0:
    np.testing.assert_allclose(fitted["weight"], truth.mean(), atol=0.05)
    np.testing.assert_allclose(fitted["mean"], 3.0, atol=0.2)

  def precision_recall(t):
    predicted = positive > float(t)
    return (predicted & truth).sum() / predicted.sum(), (predicted & truth).sum() / truth.sum()

  precision, recall = precision_recall(threshold)
  assert precision > min_precision and recall > 0.9, (precision, recall)
  pairs_precision, _ = precision_recall(masks.fit_threshold(positive, negative))
  assert pairs_precision < precision - min_gain, (pairs_precision, precision)


def test_mixture_threshold_on_8_devices_equals_one_device():
  positive, negative, _ = _mixture_scores(shift=0.5, n=16)
  mask = np.ones(positive.shape, bool)
  mask[:, -3:] = False

  def fn(w, x, axis_name=None):
    return w * masks.fit_mixture_threshold(x["p"], x["n"], x["m"], axis_name=axis_name)[0]

  assert_sharded_equals_single(fn, jnp.float32(1.0), {"p": positive, "n": negative, "m": mask})


def _pairs(n=16, patches=4, length=6, d=8, seed=6):
  """Token features with an intersection: some tokens of each sample lean towards its partner."""
  rng = np.random.default_rng(seed)
  z_image = ref.normalize(rng.normal(size=(n, d))).astype(np.float32)
  z_text = ref.normalize(rng.normal(size=(n, d))).astype(np.float32)
  image_tokens = (
      rng.normal(size=(n, patches, d))
      + 2.0 * (rng.uniform(size=(n, patches, 1)) < 0.4) * z_text[:, None]
  )
  text_tokens = (
      rng.normal(size=(n, length, d))
      + 2.0 * (rng.uniform(size=(n, length, 1)) < 0.4) * z_image[:, None]
  )
  text_mask = np.arange(length)[None] < rng.integers(2, length + 1, (n, 1))
  return (
      image_tokens.astype(np.float32),
      text_tokens.astype(np.float32),
      text_mask,
      z_image,
      z_text,
  )


def test_fit_masks_match_the_reference_thresholds_and_scores():
  image_tokens, text_tokens, text_mask, z_image, z_text = _pairs()
  fitted = masks.fit_masks(image_tokens, text_tokens, text_mask, z_image, z_text)
  patch_valid = np.ones(image_tokens.shape[:2], bool)
  image_threshold = ref.intersection_threshold(image_tokens, patch_valid, z_text)
  text_threshold = ref.intersection_threshold(text_tokens, text_mask, z_image)
  np.testing.assert_allclose(fitted["image_threshold"], image_threshold, rtol=1e-4)
  np.testing.assert_allclose(fitted["text_threshold"], text_threshold, rtol=1e-4)
  image_scores = ref.token_scores(image_tokens, z_text)
  text_scores = ref.token_scores(text_tokens, z_image)
  np.testing.assert_allclose(fitted["image_scores"], image_scores, atol=1e-5)
  # Masks: above the threshold, never on text padding. Scores within rounding of the threshold
  # may fall either way.
  clear = np.abs(text_scores - text_threshold) > 1e-4
  np.testing.assert_array_equal(
      np.asarray(fitted["text_intersection_mask"])[clear],
      ((text_scores > text_threshold) & text_mask)[clear],
  )
  clear = np.abs(image_scores - image_threshold) > 1e-4
  np.testing.assert_array_equal(
      np.asarray(fitted["image_intersection_mask"])[clear], (image_scores > image_threshold)[clear]
  )
  assert 0 < np.asarray(fitted["text_intersection_mask"]).sum() < text_mask.sum()
  # No gradient reaches the tokens or globals through the masks and thresholds.
  grad = jax.grad(
      lambda t: masks.fit_masks(image_tokens, t, text_mask, z_image, z_text)["text_threshold"]
  )(text_tokens)
  assert not np.any(np.asarray(grad))


def test_contrast_scores_equal_a_float64_loop_over_the_definition():
  image_tokens, text_tokens, text_mask, z_image, z_text = _pairs()
  fitted = masks.fit_masks(image_tokens, text_tokens, text_mask, z_image, z_text, score="contrast")
  unit = lambda x: np.asarray(x, np.float64) / np.linalg.norm(x, axis=-1, keepdims=True)
  for tokens, partners, key in ((text_tokens, z_image, "text"), (image_tokens, z_text, "image")):
    tokens, partners = unit(tokens), unit(partners)
    n, length = tokens.shape[:2]
    expected = np.zeros((n, length))
    for b in range(n):
      for t in range(length):
        others = [tokens[b, t] @ partners[m] for m in range(n) if m != b]
        expected[b, t] = tokens[b, t] @ partners[b] - sum(others) / len(others)
    np.testing.assert_allclose(fitted[f"{key}_scores"], expected, atol=1e-5)
  # Threshold: the paper's crossing fitted to the contrast scores of positive and negative pairs.
  positive, _, negative, negative_mask = masks.token_score_samples(
      text_tokens, text_mask, z_image, score="contrast"
  )
  np.testing.assert_allclose(
      np.mean(np.asarray(negative)[np.asarray(negative_mask)]), 0.0, atol=1e-6
  )  # centred on 0 by construction
  threshold = masks.fit_threshold(positive, negative, text_mask, negative_mask)
  np.testing.assert_allclose(fitted["text_threshold"], threshold, rtol=1e-5)
  with pytest.raises(ValueError, match="token score"):
    masks.fit_masks(image_tokens, text_tokens, text_mask, z_image, z_text, score="lift")


def test_contrast_score_removes_an_offset_shared_by_every_partner():
  """A unit as close to every partner (a template word) scores high as a cosine, 0 in contrast;
  a unit that points at its own partner only scores high in both."""
  n, d = 4, 8
  z = np.eye(n, d, dtype=np.float32)
  common = np.full(d, 0.0, np.float32)
  common[:n] = 1.0  # equally close to every partner
  own = z  # the partner's direction
  tokens = np.stack([common[None].repeat(n, 0), own], axis=1)  # [n, 2, d]: template, intersection
  mask = np.ones((n, 2), bool)
  cosine = masks.token_score_samples(tokens, mask, z)[0]
  contrast = masks.token_score_samples(tokens, mask, z, score="contrast")[0]
  np.testing.assert_allclose(cosine[:, 0], 0.5, rtol=1e-6)
  np.testing.assert_allclose(contrast[:, 0], 0.0, atol=1e-6)
  np.testing.assert_allclose(contrast[:, 1], 1.0, atol=1e-6)


@pytest.mark.parametrize("score", ["cosine", "contrast"])
def test_fit_masks_on_8_devices_equal_one_device(score):
  inputs = dict(zip(("image_tokens", "text_tokens", "text_mask", "z_image", "z_text"), _pairs()))
  inputs["score"] = score
  single = masks.fit_masks(**inputs)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec

  def per_device(x):
    fitted = masks.fit_masks(**x, axis_name="d", score=score)
    # Thresholds are scalars on each device: give them an axis so that the 8 copies are stacked.
    return {k: v[None] if v.ndim == 0 else v for k, v in fitted.items()}

  sharded = jax.jit(
      jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"),), out_specs=P("d"), check_vma=False)
  )
  got = jax.block_until_ready(sharded({k: v for k, v in inputs.items() if k != "score"}))
  for key in ("image_threshold", "text_threshold"):
    np.testing.assert_allclose(got[key], np.full(8, single[key]), rtol=1e-5)
  for key in ("image_scores", "text_scores"):
    np.testing.assert_allclose(got[key], single[key], atol=1e-6)


def test_random_masks_keep_each_rows_density_and_do_not_depend_on_the_split():
  mask = np.array([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
  valid = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)
  keys = methods.example_keys(jax.random.PRNGKey(0), 2)
  random = np.asarray(masks.random_mask_like(keys, mask, valid))
  np.testing.assert_array_equal(random.sum(-1), [2, 1])
  assert not np.any(random[~valid])
  # Each row depends on its own key only: the second row alone gives the same mask.
  alone = np.asarray(masks.random_mask_like(keys[1:], mask[1:], valid[1:]))
  np.testing.assert_array_equal(alone[0], random[1])
  draws = {
      tuple(
          np.asarray(
              masks.random_mask_like(methods.example_keys(jax.random.PRNGKey(s), 2), mask, valid)
          )[0]
      )
      for s in range(8)
  }
  assert len(draws) > 1  # random, not the learned mask again


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_anneal_rho_goes_from_one_to_zero(schedule):
  rho = jax.jit(lambda s: masks.anneal_rho(s, 100, schedule=schedule))
  values = [float(rho(jnp.int32(s))) for s in (0, 25, 50, 75, 100, 1000)]
  assert values[0] == 1.0 and values[-2] == 0.0 and values[-1] == 0.0
  assert all(a > b for a, b in zip(values[:5], values[1:5]))
  np.testing.assert_allclose(values[2], 0.5, atol=1e-6)
  if schedule == "cosine":
    np.testing.assert_allclose(values[1], 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    masks.anneal_rho(0, 10, schedule="step")


def test_anneal_rho_holds_one_until_the_start():
  rho = jax.jit(lambda s: masks.anneal_rho(s, 100, start=50))
  values = [float(rho(jnp.int32(s))) for s in (0, 49, 50, 100, 150, 151)]
  np.testing.assert_allclose(values, [1.0, 1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose([float(masks.anneal_rho(s, 0, start=3)) for s in (2, 3)], [1, 0])
  with pytest.raises(ValueError, match="start"):
    masks.anneal_rho(0, 10, start=-1)


def test_annealed_mask():
  hard = jnp.array([[1.0, 0.0, 1.0]])
  np.testing.assert_allclose(masks.annealed_mask(hard, 1.0), [[1, 1, 1]])
  np.testing.assert_allclose(masks.annealed_mask(hard, 0.25), [[1, 0.25, 1]])
  np.testing.assert_allclose(masks.annealed_mask(hard, 0.0, jnp.array([[1, 1, 0]])), [[1, 0, 0]])


def test_mask_quality_on_hand_made_masks():
  predicted = jnp.array([[1, 1, 0, 0, 1], [0, 0, 0, 0, 1]], bool)
  truth = jnp.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], bool)
  valid = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)  # the last entry of row 0 is padding
  quality = masks.mask_quality(predicted, truth, valid)
  # Hits 2 (row 0 col 0, row 1 col 4); predicted 3; true 3; union 4.
  assert float(quality["iou"]) == pytest.approx(2 / 4)
  assert float(quality["precision"]) == pytest.approx(2 / 3)
  assert float(quality["recall"]) == pytest.approx(2 / 3)
  empty = masks.mask_quality(jnp.zeros((1, 3), bool), jnp.zeros((1, 3), bool))
  assert float(empty["iou"]) == 0.0 and float(empty["precision"]) == 0.0


def test_patch_labels_by_fraction_of_intersection_pixels():
  labels = np.zeros((1, 4, 4), np.uint8)  # 2x2 grid of 2x2-pixel patches
  labels[0, 0, 0] = 1  # patch 0: 1/4 intersection pixels
  labels[0, 0:2, 2:4] = 1  # patch 1: all intersection
  labels[0, 2:4, 0:2] = 2  # patch 2: an image-only object
  got = masks.patch_labels(jnp.asarray(labels), (2, 2), min_fraction=0.5)
  np.testing.assert_array_equal(got, [[False, True, False, False]])
  got = masks.patch_labels(jnp.asarray(labels), (2, 2), min_fraction=0.25)
  np.testing.assert_array_equal(got, [[True, True, False, False]])
  with pytest.raises(ValueError, match="patch grid"):
    masks.patch_labels(jnp.asarray(labels), (3, 3))
