"""SOLAR's losses against float64 numpy references; edge cases; sharded == single-device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import solar_reference as ref
from sharding import assert_sharded_equals_single

from mmret.losses.contrastive import multi_positive_infonce
from mmret.ops import l2_normalize
from mmret.recipes.solar import losses


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
      ref.normalize(rng.normal(size=(n, d))).astype(np.float32),
  )


# --- Global-to-local alignment --------------------------------------------------------------------


def test_gla_matches_reference_with_an_all_padding_row():
  tokens, mask, partner = _tokens(n=5, empty_row=2)
  got = losses.global_to_local_alignment(tokens, mask, partner, margin=0.3)
  np.testing.assert_allclose(got, ref.gla(tokens, mask, partner, 0.3), rtol=1e-5)
  assert losses.global_to_local_alignment(tokens[:1], mask[:1], partner[:1]) == 0.0


def _gla_inputs(seed, text_tokens, text_mask, z_image):
  """gla_loss's arrays: the given text side plus random patches [16,4,6] and text globals."""
  rng = np.random.default_rng(seed)
  return {
      "image_tokens": rng.normal(size=(16, 4, 6)).astype(np.float32),
      "text_tokens": text_tokens,
      "text_mask": text_mask,
      "z_image": z_image,
      "z_text": ref.normalize(rng.normal(size=(16, 6))).astype(np.float32),
  }


def test_gla_both_directions_and_sharded_equals_single():
  text_tokens, text_mask, z_image = _tokens(n=16, seed=1, empty_row=5)
  inputs = _gla_inputs(1, text_tokens, text_mask, z_image)
  both = losses.gla_loss(**inputs, margin=0.5)
  expected = 0.5 * (
      ref.gla(inputs["image_tokens"], np.ones((16, 4), bool), inputs["z_text"], 0.5)
      + ref.gla(text_tokens, text_mask, z_image, 0.5)
  )
  np.testing.assert_allclose(both, expected, rtol=1e-5)

  def fn(w, x, axis_name=None):
    x = dict(
        x,
        image_tokens=x["image_tokens"] * w["a"] + x["text_tokens"][:, :4],
        z_text=x["z_text"] + w["b"] * x["z_image"],
    )
    return losses.gla_loss(**x, margin=0.5, axis_name=axis_name)

  assert_sharded_equals_single(fn, {"a": jnp.float32(1.2), "b": jnp.float32(0.3)}, inputs)


def test_per_token_gla_matches_reference_and_sharded_equals_single():
  tokens, mask, partner = _tokens(n=16, seed=3, empty_row=4)
  got = losses.token_to_global_infonce(tokens, mask, partner, temperature=0.2)
  np.testing.assert_allclose(got, ref.token_infonce(tokens, mask, partner, 0.2), rtol=1e-5)
  # Partners a token cannot tell apart (as a template word cannot) cost log N whatever it is.
  same_partners = np.repeat(partner[:1], 4, axis=0)
  np.testing.assert_allclose(
      losses.token_to_global_infonce(tokens[:4], np.ones((4, 5), bool), same_partners),
      np.log(4),
      rtol=1e-5,
  )

  inputs = _gla_inputs(4, tokens, mask, partner)
  both = losses.gla_loss(**inputs, kind="token", temperature=0.2)
  expected = 0.5 * (
      ref.token_infonce(inputs["image_tokens"], np.ones((16, 4), bool), inputs["z_text"], 0.2)
      + ref.token_infonce(tokens, mask, partner, 0.2)
  )
  np.testing.assert_allclose(both, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown GLA kind 'max'"):
    losses.gla_loss(**inputs, kind="max")

  def fn(w, x, axis_name=None):
    x = dict(x, image_tokens=x["image_tokens"] * w["a"], z_text=x["z_text"] + w["b"] * x["z_image"])
    return losses.gla_loss(**x, kind="token", temperature=0.2, axis_name=axis_name)

  assert_sharded_equals_single(fn, {"a": jnp.float32(1.2), "b": jnp.float32(0.3)}, inputs)


# --- Correlation distillation ---------------------------------------------------------------------


def test_pearson_correlation_masks_and_degenerate_rows():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
  mask = np.ones((3, 7), bool)
  mask[0, 5:] = False
  mask[1, 1:] = False  # a single entry: not a valid row
  a[2] = 1.0  # constant row: correlation 0
  corr, valid = losses.pearson_correlation(a, b, mask)
  np.testing.assert_allclose(corr[0], np.corrcoef(a[0, :5], b[0, :5])[0, 1], rtol=1e-5)
  assert list(np.asarray(valid)) == [True, False, True]
  np.testing.assert_allclose(corr[2], 0.0, atol=1e-6)


def test_local_distillation_matches_reference_and_is_zero_for_equal_models():
  teacher, mask, _ = _tokens(n=4, t=6, seed=3, empty_row=1)
  student = teacher + 0.5 * np.random.default_rng(3).normal(size=teacher.shape).astype(np.float32)
  mask[0, :] = True
  got = losses.local_distillation(teacher, student, mask)
  np.testing.assert_allclose(got, ref.local_distillation(teacher, student, mask), rtol=1e-5)
  np.testing.assert_allclose(losses.local_distillation(teacher, teacher, mask), 0.0, atol=1e-5)
  # The frozen teacher receives no gradient.
  grad = jax.grad(lambda t: losses.local_distillation(t, student, mask))(teacher)
  assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("include_self", [False, True])
def test_global_distillation_matches_reference_and_sharded_equals_single(include_self):
  rng = np.random.default_rng(4)
  x = {k: rng.normal(size=(16, 6)).astype(np.float32) for k in ("ta", "tb", "sa", "sb")}
  got = losses.global_distillation(x["ta"], x["tb"], x["sa"], x["sb"], include_self=include_self)
  want = ref.global_distillation(x["ta"], x["tb"], x["sa"], x["sb"], include_self=include_self)
  np.testing.assert_allclose(got, want, rtol=1e-5)

  def fn(w, x, axis_name=None):
    return losses.global_distillation(
        x["ta"],
        x["tb"],
        x["sa"] * w,
        x["sb"] + w * x["sa"],
        include_self=include_self,
        axis_name=axis_name,
    )

  assert_sharded_equals_single(fn, jnp.float32(0.7), x)


def test_global_distillation_without_diagonal_sees_an_unrelated_teacher():
  """Within-modality matrices: the shared diagonal of 1s makes unrelated rows correlate."""
  rng = np.random.default_rng(6)
  teacher, student = (rng.normal(size=(32, 64)).astype(np.float32) for _ in range(2))
  with_self = float(
      losses.global_distillation(teacher, teacher, student, student, include_self=True)
  )
  without = float(losses.global_distillation(teacher, teacher, student, student))
  assert with_self < 0.5 and abs(without - 1.0) < 0.1, (with_self, without)


# --- The stage-1 loss ------------------------------------------------------------------------------


def _stage1_outputs(seed=5, n=6, patches=4, length=5, d=8):
  rng = np.random.default_rng(seed)
  text_tokens, text_mask, _ = _tokens(n=n, t=length, d=d, seed=seed)
  f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  unit = lambda *shape: ref.normalize(f(*shape)).astype(np.float32)  # noqa: E731
  return {
      "image_tokens": f(n, patches, d),
      "text_tokens": text_tokens,
      "text_mask": text_mask,
      "z_image": unit(n, d),
      "z_text": unit(n, d),
      "masked_z_image": unit(n, d),
      "masked_z_text": unit(n, d),
      "teacher_image_tokens": f(n, patches, d),
      "teacher_text_tokens": f(n, length, d),
      "teacher_image_global": f(n, d),
      "teacher_text_global": f(n, d),
      "image_intersection_mask": rng.uniform(size=(n, patches)) < 0.5,
      "text_intersection_mask": (rng.uniform(size=(n, length)) < 0.5) & text_mask,
      "image_threshold": np.float32(0.1),
      "text_threshold": np.float32(0.2),
      "rho": np.float32(0.25),
      "logit_scale": np.float32(np.log(10.0)),
  }


def test_stage1_loss_is_the_weighted_sum_of_its_references():
  out = _stage1_outputs()
  weights = dict(itc_weight=1.5, gla_weight=0.7, ld_weight=0.3, gd_weight=0.2)
  loss, metrics = losses.stage1_loss(out, {}, gla_margin=0.25, temperature=0.1, **weights)
  patch_valid = np.ones(out["image_tokens"].shape[:2], bool)
  itc = ref.clip_infonce(out["masked_z_image"], out["masked_z_text"], 0.1)
  gla = 0.5 * (
      ref.gla(out["image_tokens"], patch_valid, out["z_text"], 0.25)
      + ref.gla(out["text_tokens"], out["text_mask"], out["z_image"], 0.25)
  )
  ld = 0.5 * (
      ref.local_distillation(out["teacher_image_tokens"], out["image_tokens"], patch_valid)
      + ref.local_distillation(out["teacher_text_tokens"], out["text_tokens"], out["text_mask"])
  )
  gd = 0.5 * (
      ref.global_distillation(*[out["teacher_image_global"]] * 2, *[out["z_image"]] * 2)
      + ref.global_distillation(*[out["teacher_text_global"]] * 2, *[out["z_text"]] * 2)
  )
  for name, value in (("loss_itc", itc), ("loss_gla", gla), ("loss_ld", ld), ("loss_gd", gd)):
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(loss, 1.5 * itc + 0.7 * gla + 0.3 * ld + 0.2 * gd, rtol=1e-5)
  # The ITC term reads the masked embeddings, not the unmasked globals.
  unmasked = ref.clip_infonce(out["z_image"], out["z_text"], 0.1)
  assert abs(unmasked - itc) > 0.05
  np.testing.assert_allclose(
      metrics["text_mask_fraction"],
      out["text_intersection_mask"][out["text_mask"]].mean(),
      rtol=1e-6,
  )


def test_stage1_loss_reports_mask_quality_against_the_ground_truth():
  out = _stage1_outputs()
  n, length = out["text_mask"].shape
  rng = np.random.default_rng(6)
  batch = {
      "text_intersection": rng.integers(0, 3, (n, length)),
      "image_labels": np.zeros((n, 8, 8), np.uint8),
  }
  batch["image_labels"][:, :4, :4] = 1  # patch 0 (top left of the 2x2 grid) is intersection
  _, metrics = losses.stage1_loss(out, batch)
  truth = (batch["text_intersection"] == 1) & out["text_mask"]
  predicted = out["text_intersection_mask"]
  hits = np.sum(predicted & truth)
  np.testing.assert_allclose(metrics["text_mask_precision"], hits / predicted.sum(), rtol=1e-6)
  np.testing.assert_allclose(metrics["text_mask_recall"], hits / truth.sum(), rtol=1e-6)
  patches = out["image_intersection_mask"]
  np.testing.assert_allclose(metrics["patch_mask_recall"], patches[:, 0].mean(), rtol=1e-6)
  np.testing.assert_allclose(
      metrics["patch_mask_precision"], patches[:, 0].sum() / patches.sum(), rtol=1e-6
  )


# --- Multi-positive InfoNCE and the stage-2 loss ---------------------------------------------------


def test_multi_positive_infonce_matches_formula():
  rng = np.random.default_rng(9)
  anchors = ref.normalize(rng.normal(size=(4, 5))).astype(np.float32)
  candidates = ref.normalize(rng.normal(size=(9, 5))).astype(np.float32)
  positives = rng.uniform(size=(4, 9)) < 0.3
  positives[0, :2] = True
  positives[3] = False  # no positive: left out
  negatives = rng.uniform(size=(4, 9)) < 0.6
  loss, valid = multi_positive_infonce(anchors, candidates, positives, negatives, temperature=0.1)
  np.testing.assert_allclose(
      loss, ref.multi_positive(anchors, candidates, positives, negatives, 0.1), rtol=1e-5, atol=1e-6
  )
  assert list(np.asarray(valid)) == [bool(r.any()) for r in positives]


def _stage2_inputs():
  rng = np.random.default_rng(10)
  x = {k: ref.normalize(rng.normal(size=(16, 6))).astype(np.float32) for k in ("fa", "fp", "fn")}
  x["has_pos"] = rng.uniform(size=16) < 0.8
  x["has_neg"] = rng.uniform(size=16) < 0.7
  return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_stage2_contrastive_loss_matches_reference(symmetric):
  x = _stage2_inputs()
  got = losses.stage2_contrastive_loss(
      x["fa"], x["fp"], x["fn"], x["has_pos"], x["has_neg"], temperature=0.1, symmetric=symmetric
  )
  expected = ref.stage2_contrastive(
      x["fa"], x["fp"], x["fn"], x["has_pos"], x["has_neg"], 0.1, symmetric
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Which view is the positive matters: the hard negative in its place gives another value.
  swapped = ref.stage2_contrastive(
      x["fa"], x["fn"], x["fp"], x["has_pos"], x["has_neg"], 0.1, symmetric
  )
  assert abs(swapped - expected) > 0.1


def test_stage2_contrastive_loss_sharded_equals_single():
  def fn(w, x, axis_name=None):
    fp = l2_normalize(x["fp"] + w * x["fa"])
    return losses.stage2_contrastive_loss(
        x["fa"], fp, x["fn"] * w, x["has_pos"], x["has_neg"], temperature=0.1, axis_name=axis_name
    )

  assert_sharded_equals_single(fn, jnp.float32(0.5), _stage2_inputs())


def test_stage2_contrastive_loss_without_any_positive_is_zero():
  f = ref.normalize(np.random.default_rng(11).normal(size=(3, 4))).astype(np.float32)
  none = np.zeros(3, bool)
  assert float(losses.stage2_contrastive_loss(f, f, f, none, none)) == 0.0
