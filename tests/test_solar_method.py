"""SOLAR's stages end to end: each stage's chain (masks -> views -> joint embeddings -> loss) against
a float64 numpy reference, the forward passes' wiring into the real model, the mask evaluator on
known answers, and the two-stage run with its files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import solar_reference as ref
from PIL import Image

from configs import solar as solar_config
from mmret import checkpoint as ckpt_lib
from mmret import methods, registry, train
from mmret import step as step_lib
from mmret.models.retrieval import RetrievalModel, build_model
from mmret.recipes.solar import evaluator, losses, masks, views
from mmret.recipes.solar import method as solar

VOCAB, TEXT_LEN, IMAGE_SIZE = 40, 12, 32


# --------------------------------------------------------------------------------------------------
# Stage 1: fitted masks -> annealed attention weights -> masked ITC, against numpy
# --------------------------------------------------------------------------------------------------


def _stage1_inputs(n=8, patches=4, length=6, d=8, seed=0):
  """Tokens of which about 40% lean towards the partner's global (an intersection to find)."""
  rng = np.random.default_rng(seed)
  z_image = ref.normalize(rng.normal(size=(n, d))).astype(np.float32)
  z_text = ref.normalize(rng.normal(size=(n, d))).astype(np.float32)
  lean = lambda shape, partner: (
      rng.normal(size=shape)
      + 2.5 * (rng.uniform(size=shape[:2] + (1,)) < 0.4) * partner[:, None]  # noqa: E731
  ).astype(np.float32)
  text_mask = np.arange(length)[None] < rng.integers(3, length + 1, (n, 1))
  return {
      "image_tokens": lean((n, patches, d), z_text),
      "text_tokens": lean((n, length, d), z_image),
      "text_mask": text_mask,
      "z_image": z_image,
      "z_text": z_text,
  }


def _stage1_reference(x, rho, temperature):
  """(masked f_V, masked f_L, ITC) computed in numpy from the raw tokens and globals."""
  patch_valid = np.ones(x["image_tokens"].shape[:2], bool)
  image_mask = ref.token_scores(x["image_tokens"], x["z_text"]) > ref.intersection_threshold(
      x["image_tokens"], patch_valid, x["z_text"]
  )
  text_mask_hat = (
      ref.token_scores(x["text_tokens"], x["z_image"])
      > ref.intersection_threshold(x["text_tokens"], x["text_mask"], x["z_image"])
  ) & x["text_mask"]
  f_image = ref.pooled_joint(
      image_tokens=x["image_tokens"], image_weights=rho + (1 - rho) * image_mask
  )
  f_text = ref.pooled_joint(
      text_tokens=x["text_tokens"],
      text_mask=x["text_mask"],
      text_weights=rho + (1 - rho) * text_mask_hat,
  )
  return f_image, f_text, ref.clip_infonce(f_image, f_text, temperature)


def test_stage1_masked_itc_matches_the_reference_and_depends_on_the_masks():
  x = _stage1_inputs()
  rho, temperature = 0.2, 0.1
  intersection = masks.fit_masks(**x)
  embedded = solar.masked_itc_embeddings(
      x["image_tokens"], x["text_tokens"], x["text_mask"], intersection, rho, ref.pooled_joint_jax
  )
  f_image, f_text, itc = _stage1_reference(x, rho, temperature)
  np.testing.assert_allclose(embedded["masked_z_image"], f_image, atol=1e-5)
  np.testing.assert_allclose(embedded["masked_z_text"], f_text, atol=1e-5)
  outputs = dict(
      x,
      **embedded,
      **intersection,
      rho=jnp.float32(rho),
      logit_scale=jnp.float32(0.0),
      teacher_image_tokens=x["image_tokens"],
      teacher_text_tokens=x["text_tokens"],
      teacher_image_global=x["z_image"],
      teacher_text_global=x["z_text"],
  )
  _, metrics = losses.stage1_loss(outputs, {}, temperature=temperature)
  np.testing.assert_allclose(metrics["loss_itc"], itc, rtol=1e-5)
  # The masks matter here: without them (rho = 1, every token visible) the ITC is another number.
  _, _, unmasked_itc = _stage1_reference(x, 1.0, temperature)
  assert abs(unmasked_itc - itc) > 1e-2


# --------------------------------------------------------------------------------------------------
# Stage 2: views -> joint embeddings of the three views -> multi-positive InfoNCE, against numpy
# --------------------------------------------------------------------------------------------------

# Per sample: (intersection tokens, difference tokens, padding); 16 patches in 4 segments of 4,
# segments 0 and 1 intersection, 2 and 3 difference.
TEXT_LAYOUT = ((3, 2, 1), (2, 4, 0), (1, 4, 1), (4, 0, 2))
SEGMENTS = np.repeat(np.arange(4), 4)


def _stage2_inputs(d=6, seed=1):
  """Within a sample, every intersection unit has one feature vector and every difference unit
  another: which units a view drops is random, but the pooled embedding depends only on how many."""
  rng = np.random.default_rng(seed)
  n, length = len(TEXT_LAYOUT), sum(TEXT_LAYOUT[0])
  text_tokens = np.zeros((n, length, d), np.float32)
  text_mask = np.zeros((n, length), bool)
  text_intersection = np.zeros((n, length), bool)
  image_tokens = np.zeros((n, len(SEGMENTS), d), np.float32)
  for i, (shared, only_text, _) in enumerate(TEXT_LAYOUT):
    text_tokens[i, :shared] = rng.normal(size=d)
    text_tokens[i, shared : shared + only_text] = rng.normal(size=d)
    text_mask[i, : shared + only_text] = True
    text_intersection[i, :shared] = True
    image_tokens[i, SEGMENTS < 2] = rng.normal(size=d)
    image_tokens[i, SEGMENTS >= 2] = rng.normal(size=d)
  patch_scores = np.where(SEGMENTS < 2, 0.9, 0.1)[None].repeat(n, 0).astype(np.float32)
  return {
      "image_tokens": image_tokens,
      "text_tokens": text_tokens,
      "text_mask": text_mask,
      "text_intersection": text_intersection,
      "patch_scores": patch_scores,
      "segment_ids": SEGMENTS[None].repeat(n, 0),
  }


def _stage2_reference(x, mask_ratio, view_mode):
  """Views by counts: the positive drops round(mask_ratio * n) of n >= 2 intersection units (at
  least one, keeping one), the negative every difference unit (negative_ratio 1). Image units are
  segments of 4 patches: of the 2 intersection segments the positive drops one, the negative
  drops both difference segments; with view_mode 'text' the image stays whole in every view."""
  image = view_mode == "both"
  anchors, positives, negatives, has_pos, has_neg = [], [], [], [], []
  for i, (shared, only_text, _) in enumerate(TEXT_LAYOUT):
    drop = int(np.clip(np.round(mask_ratio * shared), 1, shared - 1)) if shared >= 2 else 0
    text_a = x["text_tokens"][i, 0]
    text_b = x["text_tokens"][i, shared] if only_text else np.zeros_like(text_a)
    image_a, image_b = x["image_tokens"][i, 0], x["image_tokens"][i, -1]

    def pooled(n_text_a, n_text_b, n_image_a, n_image_b):
      total = n_text_a * text_a + n_text_b * text_b + n_image_a * image_a + n_image_b * image_b
      return ref.normalize(total / (n_text_a + n_text_b + n_image_a + n_image_b))

    anchors.append(pooled(shared, only_text, 8, 8))
    positives.append(pooled(shared - drop, only_text, 4 if image else 8, 8))
    negatives.append(pooled(shared, 0, 8, 0 if image else 8))
    has_pos.append(image or drop > 0)
    has_neg.append(image or only_text > 0)
  return tuple(map(np.stack, (anchors, positives, negatives))) + (
      np.array(has_pos),
      np.array(has_neg),
  )


def _view_embeddings(x, seed, view_mode):
  keys = methods.example_keys(jax.random.PRNGKey(seed), len(TEXT_LAYOUT))
  built = views.stage2_views(
      keys,
      x["text_intersection"],
      x["text_mask"],
      x["patch_scores"],
      jnp.float32(0.5),
      x["segment_ids"],
      4,
      mode=view_mode,
      mask_ratio=0.5,
      negative_ratio=1.0,
  )
  return solar.view_embeddings(
      built, x["image_tokens"], x["text_tokens"], x["text_mask"], ref.pooled_joint_jax
  )


@pytest.mark.parametrize("seed,view_mode", [(0, "both"), (1, "both"), (0, "text")])
def test_stage2_views_and_loss_match_the_reference(seed, view_mode):
  x = _stage2_inputs()
  fa, fp, fn, has_pos, has_neg = _stage2_reference(x, 0.5, view_mode)
  out = _view_embeddings(x, seed, view_mode)
  np.testing.assert_allclose(out["z_anchor"], fa, atol=1e-5)
  np.testing.assert_allclose(out["z_positive"], fp, atol=1e-5)
  np.testing.assert_allclose(out["z_negative"], fn, atol=1e-5)
  np.testing.assert_array_equal(out["has_positive"], has_pos)
  np.testing.assert_array_equal(out["has_negative"], has_neg)
  outputs = dict(
      out,
      text_mask=x["text_mask"],
      image_threshold=jnp.float32(0.5),
      text_threshold=jnp.float32(0.5),
  )
  loss, metrics = losses.stage2_loss(outputs, {}, temperature=0.1)
  expected = ref.stage2_contrastive(fa, fp, fn, has_pos, has_neg, 0.1, True)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["sim_positive"], np.mean(np.sum(fa * fp, -1)), rtol=1e-5)
  # Swapping the views, or views that ignore the masks, give other values.
  swapped = ref.stage2_contrastive(fa, fn, fp, has_pos, has_neg, 0.1, True)
  unmasked = ref.stage2_contrastive(fa, fa, fa, has_pos, has_neg, 0.1, True)
  assert abs(swapped - expected) > 0.1 and abs(unmasked - expected) > 0.1


# --------------------------------------------------------------------------------------------------
# The forward passes with the real model
# --------------------------------------------------------------------------------------------------


def _small(config):
  """Shrinks the tiny model further so that tests compile quickly."""
  for group in ("image", "text", "joint"):
    config.model[group].depth = 1
  return config


def _model():
  config = _small(solar_config.get_config())
  return build_model(config.model, vocab_size=VOCAB, max_text_len=TEXT_LEN)


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, TEXT_LEN + 1, n)
  text_mask = np.arange(TEXT_LEN)[None] < lengths[:, None]
  return {
      "image": rng.normal(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
      "text_ids": np.where(text_mask, rng.integers(4, VOCAB, (n, TEXT_LEN)), 0).astype(np.int32),
      "text_mask": text_mask,
      "text_intersection": np.where(text_mask, rng.integers(0, 3, (n, TEXT_LEN)), 0).astype(
          np.int32
      ),
      "image_labels": rng.integers(0, 3, (n, IMAGE_SIZE, IMAGE_SIZE)).astype(np.uint8),
  }


@pytest.fixture(scope="module")
def model_and_params():
  model, batch = _model(), _batch(8)
  params = jax.jit(model.init)(
      jax.random.PRNGKey(0), {k: batch[k][:1] for k in ("image", "text_ids", "text_mask")}
  )["params"]
  return model, params, batch


def _encode_joint(model, params, **kwargs):
  return model.apply({"params": params}, train=False, method=RetrievalModel.encode_joint, **kwargs)


def test_stage1_forward_runs_the_joint_encoder_under_the_annealed_masks(model_and_params):
  model, params, batch = model_and_params
  forward = jax.jit(solar.make_stage1_forward(model, anneal_steps=10), static_argnames=())
  frozen = solar.stage1_teacher(model, params)
  out = forward(params, frozen, batch, rng=jax.random.PRNGKey(1), step=jnp.int32(8))
  np.testing.assert_allclose(out["rho"], 0.2, rtol=1e-6)
  weights = 0.2 + 0.8 * np.asarray(out["image_intersection_mask"], np.float32)
  expected = _encode_joint(model, params, image_tokens=out["image_tokens"], image_weights=weights)
  np.testing.assert_allclose(out["masked_z_image"], expected, atol=1e-5)
  text_weights = (0.2 + 0.8 * np.asarray(out["text_intersection_mask"], np.float32)) * batch[
      "text_mask"
  ]
  expected = _encode_joint(
      model,
      params,
      text_tokens=out["text_tokens"],
      text_mask=batch["text_mask"],
      text_weights=text_weights,
  )
  np.testing.assert_allclose(out["masked_z_text"], expected, atol=1e-5)
  # The masks changed the embedding (the unmasked one is z_image), and the teacher is a copy of
  # the towers the stage starts from.
  assert np.abs(np.asarray(out["masked_z_image"]) - np.asarray(out["z_image"])).max() > 1e-3
  assert sorted(frozen) == ["image_tower", "text_tower"]


@pytest.mark.parametrize("mask_source", ["learned", "oracle"])
def test_stage2_forward_embeds_the_trained_tokens_under_the_views(model_and_params, mask_source):
  model, params, batch = model_and_params
  # A mask model that differs from the trained parameters.
  mask_model = jax.tree.map(lambda p: p * 0.5, params)
  forward = jax.jit(solar.make_stage2_forward(model, mask_source=mask_source, view_mode="both"))
  out = forward(params, mask_model, batch, rng=jax.random.PRNGKey(2), step=jnp.int32(0))
  trained = solar.tower_pass(model, params, batch, train=False, with_globals=False)
  stacked = lambda x: jnp.concatenate([x, x, x])  # noqa: E731
  weights = lambda prefix: jnp.concatenate(  # noqa: E731
      [
          jnp.ones_like(out[f"{prefix}_positive_keep"])
          if prefix == "image"
          else batch["text_mask"],
          out[f"{prefix}_positive_keep"],
          out[f"{prefix}_negative_keep"],
      ]
  ).astype(jnp.float32)
  expected = _encode_joint(
      model,
      params,
      image_tokens=stacked(trained["image_tokens"]),
      text_tokens=stacked(trained["text_tokens"]),
      text_mask=stacked(batch["text_mask"]),
      image_weights=weights("image"),
      text_weights=weights("text"),
  )
  n = len(batch["image"])
  for i, key in enumerate(("z_anchor", "z_positive", "z_negative")):
    np.testing.assert_allclose(out[key], expected[i * n : (i + 1) * n], atol=1e-5, err_msg=key)
  if mask_source == "oracle":
    # The views follow the ground truth: the positive drops only intersection tokens.
    truth = (batch["text_intersection"] == 1) & batch["text_mask"]
    dropped = batch["text_mask"] & ~np.asarray(out["text_positive_keep"])
    assert dropped.any() and not (dropped & ~truth).any()
    again = forward(params, params, batch, rng=jax.random.PRNGKey(2), step=jnp.int32(0))
    np.testing.assert_array_equal(again["text_positive_keep"], out["text_positive_keep"])


def test_random_masks_keep_the_learned_density(model_and_params):
  model, params, batch = model_and_params
  frozen = solar.stage1_teacher(model, params)
  run = lambda source: jax.jit(solar.make_stage1_forward(model, mask_source=source))(  # noqa: E731
      params, frozen, batch, rng=jax.random.PRNGKey(3), step=jnp.int32(0)
  )
  learned, randomised = run("learned"), run("random")
  for key in ("image_intersection_mask", "text_intersection_mask"):
    np.testing.assert_array_equal(np.sum(randomised[key], -1), np.sum(learned[key], -1))
    assert not np.array_equal(randomised[key], learned[key])


def test_bad_settings_are_errors(model_and_params):
  model, _, _ = model_and_params
  with pytest.raises(ValueError, match="mask_source"):
    solar.make_stage1_forward(model, mask_source="oracle")
  with pytest.raises(ValueError, match="view_mode"):
    solar.make_stage2_forward(model, view_mode="none")
  config = solar_config.get_config()
  config.model.joint_kind = "fusion"
  fused = build_model(config.model, vocab_size=VOCAB, max_text_len=TEXT_LEN)
  with pytest.raises(ValueError, match="joint_kind='encoder'"):
    registry.method("solar_stage1").make_forward(fused)
  with pytest.raises(ValueError, match="text_intersection"):
    solar.oracle_intersection({"text_mask": np.ones((1, 2), bool)}, 16, patch_label_fraction=0.25)
  # The stage's method brings its loss: a loss name beside it is an error, not a silent override.
  config = dict(train.stage_configs(solar_config.get_config()))["stage1"]
  config.loss.name = "clip"
  with pytest.raises(ValueError, match="own loss"):
    train.loss_function(config)


def test_gla_argument_reaches_the_stage1_loss():
  stage1 = dict(train.stage_configs(solar_config.get_config("gla=token")))["stage1"]
  assert (stage1.loss.gla_kind, stage1.loss.gla_weight) == ("token", 1.0)
  assert dict(train.stage_configs(solar_config.get_config()))["stage1"].loss.gla_kind == "mean"
  with pytest.raises(ValueError, match=r"gla must be one of \('mean', 'token'\), got 'tokens'"):
    solar_config.get_config("gla=tokens")


# --------------------------------------------------------------------------------------------------
# The mask evaluator on known answers
# --------------------------------------------------------------------------------------------------


def test_mask_metrics_find_an_intersection_the_features_encode():
  """Intersection units point along their partner's global, the rest along a direction no global
  has: the fitted masks are the truth exactly."""
  n, length = 6, 5
  eye = np.eye(n + 1, dtype=np.float32)
  z_image, z_text = eye[:n], eye[:n]
  text_intersection = np.array([[1, 0, 2, 1, 0]] * n)
  text_mask = np.ones((n, length), bool)
  text_mask[:, -1] = False
  labels = np.zeros((n, 8, 8), np.uint8)
  labels[:, :4, :4] = 1  # patch 0 of the 2x2 grid is intersection
  labels[:, 4:, 4:] = 2  # patch 3 shows an image-only object
  true_patches = np.array([True, False, False, False])
  other = eye[n]
  outputs = {
      "z_image": z_image,
      "z_text": z_text,
      "image_tokens": np.where(true_patches[None, :, None], z_text[:, None], other),
      "text_tokens": np.where((text_intersection == 1)[..., None], z_image[:, None], other),
  }
  truth = {"text_mask": text_mask, "text_intersection": text_intersection, "image_labels": labels}
  metrics, predicted, panels = evaluator.mask_metrics(outputs, truth)
  for name in ("patch_mask", "text_mask"):
    for quality in ("precision", "recall", "iou", "auc"):
      assert metrics[f"{name}/{quality}"] == pytest.approx(100.0), (name, quality)
  # Scores by kind: intersection units score 1 (cosine to their partner), all others 0.
  assert metrics["text_scores/intersection"] == pytest.approx(1.0)
  assert metrics["text_scores/template"] == pytest.approx(0.0, abs=1e-6)
  assert metrics["text_scores/text_only"] == pytest.approx(0.0, abs=1e-6)
  assert metrics["patch_scores/image_only"] == pytest.approx(0.0, abs=1e-6)
  (_, patch_groups, _), (_, text_groups, _) = panels
  assert [v.size for v in patch_groups.values()] == [2 * n, n, n]  # background, shared, image-only
  assert [v.size for v in text_groups.values()] == [n, 2 * n, n]  # padding left out
  picture = evaluator.draw_score_histograms(panels)
  assert picture.ndim == 3 and (picture != 255).any()
  assert metrics["patch_mask/true_fraction"] == pytest.approx(25.0)
  assert metrics["text_mask/true_fraction"] == pytest.approx(50.0)
  np.testing.assert_array_equal(predicted["image"], np.tile(true_patches, (n, 1)))
  # Scores that ignore the features (all equal) find nothing: precision and recall 0.
  flat = dict(outputs, image_tokens=np.ones_like(outputs["image_tokens"]))
  metrics, _, _ = evaluator.mask_metrics(flat, truth)
  assert metrics["patch_mask/recall"] in (0.0, 100.0) and metrics["patch_mask/iou"] <= 25.0
  assert metrics["patch_mask/auc"] == pytest.approx(50.0)  # all tied


def test_auc_against_the_difference_leaves_template_units_out():
  """Template words scoring like intersection words lower the AUC against all other units, not
  the AUC against the difference (text-only) words: 2 intersection, 2 template, 1 text-only token
  per caption, scores 0.9 / 0.9 / 0.1 with one intersection token at 0.05."""
  n = 4
  kinds = np.array([[1, 1, 0, 0, 2]] * n)
  scores = np.array([[0.9, 0.05, 0.9, 0.9, 0.1]] * n, np.float32)
  z = np.eye(n, 8, dtype=np.float32)
  other = np.eye(8, dtype=np.float32)[7]
  # Token features whose cosine to the partner's image global is the score above.
  text_tokens = scores[..., None] * z[:, None] + np.sqrt(1 - scores**2)[..., None] * other
  truth = {
      "text_mask": np.ones(kinds.shape, bool),
      "text_intersection": kinds,
      "image_labels": np.zeros((n, 8, 8), np.uint8),
  }
  outputs = {"z_image": z, "z_text": z, "image_tokens": np.ones((n, 4, 8), np.float32)}
  metrics, _, _ = evaluator.mask_metrics(dict(outputs, text_tokens=text_tokens), truth)
  # Intersection [0.9, 0.05] vs others [0.9, 0.9, 0.1]: 0.9 wins 0.5 + 0.5 + 1, 0.05 wins 0 -> 2/6.
  assert metrics["text_mask/auc"] == pytest.approx(100 * 2 / 6, abs=1e-3)
  # Against the text-only word only: 0.9 > 0.1, 0.05 < 0.1 -> 1/2.
  assert metrics["text_mask/auc_vs_difference"] == pytest.approx(50.0, abs=1e-3)
  assert np.isnan(metrics["patch_mask/auc_vs_difference"])  # no image-only patch in the batch


def test_auc_equals_the_pairwise_definition():
  rng = np.random.default_rng(3)
  positive = np.round(rng.normal(0.5, 1.0, 40), 1)  # rounding makes ties
  negative = np.round(rng.normal(0.0, 1.0, 70), 1)
  pairs = [1.0 if p > q else 0.5 if p == q else 0.0 for p in positive for q in negative]
  assert evaluator.auc(positive, negative) == pytest.approx(np.mean(pairs))
  assert evaluator.auc(positive + 10, negative) == 1.0 and np.isnan(evaluator.auc([], negative))


# --------------------------------------------------------------------------------------------------
# The two-stage run
# --------------------------------------------------------------------------------------------------


def _final_state(config, workdir):
  setup = train.Setup(config)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return checkpointer.restore(setup.abstract_state(step_lib.DeviceMapping(config.mapping)))
  finally:
    checkpointer.close()


@pytest.mark.slow
def test_two_stage_run_resumes_in_stage2_and_writes_overlays(tmp_path, world_data_dir, monkeypatch):
  config = _small(solar_config.get_config("stage1_steps=2,stage2_steps=2,batch_size=16"))
  config.input.data_dir = world_data_dir
  config.log_every = 1
  config.ckpt_every = 2
  config.mapping = "shard_map"  # compiles faster than pmap; both are tested in test_recipe_steps
  del config.stages.stage2.evals["mm2mm"]  # the protocol has its own tests; keeps the run short
  config.stages.stage1.evals.masks.num_examples = 16
  config.stages.stage1.evals.masks.num_overlays = 3
  workdir = str(tmp_path / "run")

  # Preempted on stage 2's first batch (the 3rd overall): stage 1 is finished, stage 2 not begun.
  real_put_batch = step_lib.DeviceMapping.put_batch
  calls = {"n": 0}

  def crashing_put_batch(self, batch):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("simulated preemption")
    return real_put_batch(self, batch)

  monkeypatch.setattr(step_lib.DeviceMapping, "put_batch", crashing_put_batch)
  with pytest.raises(KeyboardInterrupt):
    train.run(config, workdir)
  monkeypatch.setattr(step_lib.DeviceMapping, "put_batch", real_put_batch)
  final = train.run(config, workdir)

  def lines(stage):
    with open(os.path.join(train.stage_dir(workdir, stage), "metrics.jsonl")) as f:
      return [json.loads(x) for x in f]

  assert [x["step"] for x in lines("stage1") if "loss" in x] == [1, 2]  # not run again
  assert [x["step"] for x in lines("stage2") if "loss" in x] == [1, 2]  # resumed in stage 2
  assert final["step"] == 2 and final["loss"] == lines("stage2")[-1]["loss"]
  with open(os.path.join(workdir, "stage1", "final_metrics.json")) as f:
    stage1 = json.load(f)
  # Precision x predicted = recall x true (both are the hits): the report is one set of counts.
  for name in ("patch_mask", "text_mask"):
    hits_a = (
        stage1[f"eval/masks/{name}/precision"] * stage1[f"eval/masks/{name}/predicted_fraction"]
    )
    hits_b = stage1[f"eval/masks/{name}/recall"] * stage1[f"eval/masks/{name}/true_fraction"]
    assert hits_a == pytest.approx(hits_b, rel=1e-5, abs=1e-6)
  assert "text_mask_iou" in stage1  # mask quality in the training stream

  # Stage 2's frozen mask model is stage 1's final model.
  (_, stage1_config), (_, stage2_config) = train.stage_configs(config)
  stage1_params = jax.device_get(
      _final_state(stage1_config, os.path.join(workdir, "stage1")).params
  )
  stage2_frozen = jax.device_get(
      _final_state(stage2_config, os.path.join(workdir, "stage2")).frozen
  )
  jax.tree.map(np.testing.assert_array_equal, stage1_params, stage2_frozen)

  masks_dir = os.path.join(workdir, "stage1", "eval", "masks")
  overlay = Image.open(os.path.join(masks_dir, "overlays.png"))
  legend = len(evaluator.OVERLAY_LEGEND) * evaluator.LEGEND_ROW_HEIGHT + 8
  assert overlay.size == (4 * (3 * 32 + 4), 4 * (3 * 32 + 2 * 2) + legend)  # 3 rows of 3 panels
  with open(os.path.join(masks_dir, "text_masks.jsonl")) as f:
    rows = [json.loads(x) for x in f]
  assert len(rows) == 3 and all(set(r["true"]) <= set(r["words"]) for r in rows)
