"""SOLAR recipe: stage methods and losses, mask quality, sharding, the two-stage run, its files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from configs import solar as solar_config
from mmret import checkpoint as ckpt_lib
from mmret import losses, methods, train
from mmret import step as step_lib
from mmret.losses import solar as solar_losses
from mmret.models.retrieval import build_model

VOCAB, TEXT_LEN, IMAGE_SIZE = 40, 12, 32


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


def _stage(name, model, batch, **method_hparams):
  """(params, frozen, forward, loss) of a SOLAR stage, parameters initialised from seed 0."""
  method = methods.get(name)
  params = model.init(
      jax.random.PRNGKey(0), {k: batch[k][:1] for k in ("image", "text_ids", "text_mask")}
  )["params"]
  frozen = method.init_frozen(model, params, **method_hparams)
  return params, frozen, method.make_forward(model, **method_hparams), losses.get(name)


def test_stage1_random_masks_keep_the_learned_masks_density():
  rng = np.random.default_rng(0)
  text_mask = np.arange(10)[None] < rng.integers(3, 11, (6, 1))
  outputs = {
      "image_tokens": rng.normal(size=(6, 16, 8)),
      "text_tokens": rng.normal(size=(6, 10, 8)),
      "text_mask": text_mask,
      "z_image": rng.normal(size=(6, 8)),
      "z_text": rng.normal(size=(6, 8)),
  }
  outputs = {k: jnp.asarray(v) for k, v in outputs.items()}
  learned = solar_losses.stage1_masks(outputs)
  randomised = solar_losses.stage1_masks(dict(outputs, random_mask_rng=jax.random.PRNGKey(7)))
  for key in ("image_mask", "text_mask"):
    assert 0 < float(learned[key].sum()) < learned[key].size
    np.testing.assert_array_equal(randomised[key].sum(-1), learned[key].sum(-1))
    assert not np.array_equal(randomised[key], learned[key])
  assert not np.any(np.asarray(randomised["text_mask"])[~text_mask])


def _pooled_joint(
    image_tokens=None, text_tokens=None, text_mask=None, image_weights=None, text_weights=None
):
  """A stand-in joint encoder: the normalised weighted mean of the visible tokens."""
  weights = jnp.concatenate([image_weights, text_weights * text_mask], axis=1)
  tokens = jnp.concatenate([image_tokens, text_tokens], axis=1)
  pooled = jnp.einsum("bt,btd->bd", weights, tokens) / weights.sum(-1, keepdims=True)
  return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def test_stage2_loss_builds_views_and_is_finite():
  rng = np.random.default_rng(1)
  text_mask = np.arange(10)[None] < rng.integers(5, 11, (8, 1))
  tokens = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  outputs = {
      "image_tokens": tokens(8, 16, 8),
      "text_tokens": tokens(8, 10, 8),
      "text_mask": jnp.asarray(text_mask),
      "encode_joint": _pooled_joint,
      "mask_image_tokens": tokens(8, 16, 8),
      "mask_text_tokens": tokens(8, 10, 8),
      "mask_z_image": tokens(8, 8),
      "mask_z_text": tokens(8, 8),
      "segment_ids": jnp.asarray(np.tile(np.repeat(np.arange(4), 4), (8, 1))),
      "num_segments": 4,
      "view_rng": jax.random.PRNGKey(2),
  }
  loss, metrics = losses.get("solar_stage2")(outputs, {}, view_mode="both")
  assert np.isfinite(loss) and loss > 0
  assert 0 < float(metrics["has_positive"]) <= 1 and 0 < float(metrics["has_negative"]) <= 1
  assert float(metrics["text_positive_kept"]) < 1  # the positive views really drop tokens
  random_loss, _ = losses.get("solar_stage2")(
      dict(outputs, random_mask_rng=jax.random.PRNGKey(3)), {}, view_mode="both"
  )
  assert np.isfinite(random_loss) and random_loss != loss


def test_mask_quality_on_hand_made_masks():
  predicted = jnp.array([[1, 1, 0, 0, 1], [0, 0, 0, 0, 1]], bool)
  truth = jnp.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], bool)
  valid = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)  # the last entry of row 0 is padding
  quality = solar_losses.mask_quality(predicted, truth, valid)
  # Hits 2 (row 0 col 0, row 1 col 4); predicted 3; true 3; union 4.
  assert float(quality["iou"]) == pytest.approx(2 / 4)
  assert float(quality["precision"]) == pytest.approx(2 / 3)
  assert float(quality["recall"]) == pytest.approx(2 / 3)
  empty = solar_losses.mask_quality(jnp.zeros((1, 3), bool), jnp.zeros((1, 3), bool))
  assert float(empty["iou"]) == 0.0 and float(empty["precision"]) == 0.0


def test_patch_labels_by_fraction_of_intersection_pixels():
  labels = np.zeros((1, 4, 4), np.uint8)  # 2x2 grid of 2x2-pixel patches
  labels[0, 0, 0] = 1  # patch 0: 1/4 intersection pixels
  labels[0, 0:2, 2:4] = 1  # patch 1: all intersection
  labels[0, 2:4, 0:2] = 2  # patch 2: an image-only object
  got = solar_losses.patch_labels(jnp.asarray(labels), (2, 2), min_fraction=0.5)
  np.testing.assert_array_equal(got, [[False, True, False, False]])
  got = solar_losses.patch_labels(jnp.asarray(labels), (2, 2), min_fraction=0.25)
  np.testing.assert_array_equal(got, [[True, True, False, False]])
  with pytest.raises(ValueError, match="patch grid"):
    solar_losses.patch_labels(jnp.asarray(labels), (3, 3))


def test_random_masks_keep_each_rows_density_among_valid_entries():
  mask = jnp.array([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], jnp.float32)
  valid = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)
  random = solar_losses.random_mask_like(jax.random.PRNGKey(0), mask, valid)
  np.testing.assert_array_equal(random.sum(-1), [2, 1])
  assert not np.any(np.asarray(random)[~np.asarray(valid)])


def test_stage1_loss_is_finite_and_sharded_over_8_devices_equals_single_device():
  model, batch = _model(), _batch(16, seed=3)
  params, frozen, forward, loss_fn = _stage("solar_stage1", model, batch, anneal_steps=10)
  step = jnp.int32(4)  # rho = 0.6: annealed masks

  def loss_and_metrics(params, batch, axis_name=None):
    outputs = forward(params, frozen, batch, rng=jax.random.PRNGKey(0), step=step)
    loss, metrics = loss_fn(outputs, batch, axis_name=axis_name)
    if axis_name is not None:
      loss, metrics = jax.lax.pmean((loss, metrics), axis_name)
    return loss, metrics

  single = jax.jit(loss_and_metrics)(params, batch)
  loss, metrics = single
  assert np.isfinite(loss) and loss > 0
  assert float(metrics["rho"]) == pytest.approx(0.6)
  for key in (
      "loss_itc",
      "loss_gla",
      "loss_ld",
      "loss_gd",
      "image_threshold",
      "text_threshold",
      "image_mask_fraction",
      "text_mask_fraction",
      "text_mask_iou",
      "text_mask_precision",
      "text_mask_recall",
      "patch_mask_iou",
      "patch_mask_precision",
      "patch_mask_recall",
  ):
    assert np.isfinite(metrics[key]), key
  assert 0 <= metrics["patch_mask_iou"] <= 1 and 0 < metrics["text_mask_fraction"] < 1
  assert sorted(frozen) == ["image_tower", "text_tower"]  # the teacher: a copy of the towers

  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded_fn = jax.jit(
      jax.shard_map(
          lambda p, b: loss_and_metrics(p, b, axis_name="batch"),
          mesh=mesh,
          in_specs=(P(), P("batch")),
          out_specs=P(),
          check_vma=False,
      )
  )
  sharded_batch = {k: jax.device_put(v, NamedSharding(mesh, P("batch"))) for k, v in batch.items()}
  sharded = jax.block_until_ready(
      sharded_fn(jax.device_put(params, NamedSharding(mesh, P())), sharded_batch)
  )
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5, atol=1e-6)
  for key in single[1]:
    np.testing.assert_allclose(sharded[1][key], single[1][key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_solar_without_the_joint_encoder_is_an_error():
  config = solar_config.get_config()
  config.model.joint_kind = "fusion"
  model = build_model(config.model, vocab_size=VOCAB, max_text_len=TEXT_LEN)
  with pytest.raises(ValueError, match="joint_kind='encoder'"):
    methods.get("solar_stage1").make_forward(model)


def _final_state(config, workdir):
  setup = train.Setup(config)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return checkpointer.restore(setup.abstract_state(step_lib.DeviceMapping(config.mapping)))
  finally:
    checkpointer.close()


def test_two_stage_run_resumes_in_stage2_and_writes_overlays(tmp_path, monkeypatch):
  config = _small(solar_config.get_config("stage1_steps=2,stage2_steps=2,batch_size=16"))
  config.input.data_dir = str(tmp_path / "data")
  config.log_every = 1
  config.ckpt_every = 2
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

  steps = lambda stage: [
      json.loads(x)["step"]
      for x in open(os.path.join(workdir, stage, "metrics.jsonl"))
      if "loss" in json.loads(x)
  ]
  assert steps("stage1") == [1, 2]  # stage 1 was not run again
  assert steps("stage2") == [1, 2]  # the resumed run continued in stage 2
  assert final["step"] == 2 and np.isfinite(final["loss"])
  stage1_metrics = json.load(open(os.path.join(workdir, "stage1", "final_metrics.json")))
  assert 0 <= stage1_metrics["eval/masks/patch_mask/iou"] <= 100
  assert "text_mask_iou" in stage1_metrics  # mask quality in the training stream

  # Stage 2's frozen mask model is stage 1's final model.
  (_, stage1_config), (_, stage2_config) = train.stage_configs(config)
  stage1_params = jax.device_get(
      _final_state(stage1_config, os.path.join(workdir, "stage1")).params
  )
  stage2_frozen = jax.device_get(
      _final_state(stage2_config, os.path.join(workdir, "stage2")).frozen
  )
  jax.tree.map(np.testing.assert_array_equal, stage1_params, stage2_frozen)

  overlay = Image.open(os.path.join(workdir, "stage1", "eval", "masks", "overlays.png"))
  width, height = overlay.size
  assert width == 4 * (3 * 32 + 4) and height == 4 * (3 * 32 + 2 * 2)  # 3 rows of 3 panels
  lines = open(os.path.join(workdir, "stage1", "eval", "masks", "text_masks.jsonl")).readlines()
  assert len(lines) == 3 and {"words", "true", "predicted"} <= set(json.loads(lines[0]))


def test_stage2_oracle_masks_follow_the_ground_truth_not_the_mask_model():
  rng = np.random.default_rng(4)
  text_mask = np.arange(10)[None] < rng.integers(5, 11, (8, 1))
  tokens = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  outputs = {
      "image_tokens": tokens(8, 16, 8),
      "text_tokens": tokens(8, 10, 8),
      "text_mask": jnp.asarray(text_mask),
      "encode_joint": _pooled_joint,
      "segment_ids": jnp.asarray(np.tile(np.repeat(np.arange(4), 4), (8, 1))),
      "num_segments": 4,
      "view_rng": jax.random.PRNGKey(2),
  }
  mask_model = lambda: {
      "mask_image_tokens": tokens(8, 16, 8),  # noqa: E731
      "mask_text_tokens": tokens(8, 10, 8),
      "mask_z_image": tokens(8, 8),
      "mask_z_text": tokens(8, 8),
  }
  batch = {
      "text_intersection": np.where(text_mask, rng.integers(0, 3, (8, 10)), 0),
      "image_labels": rng.integers(0, 3, (8, 32, 32)).astype(np.uint8),
  }
  loss_fn = losses.get("solar_stage2")
  first, second = mask_model(), mask_model()
  oracle = [
      loss_fn(dict(outputs, **m), batch, view_mode="both", oracle_masks=True)[0]
      for m in (first, second)
  ]
  learned = [loss_fn(dict(outputs, **m), batch, view_mode="both")[0] for m in (first, second)]
  # Views from the labels: whatever the mask model says, the loss is the same; not so without.
  np.testing.assert_allclose(oracle[0], oracle[1], rtol=1e-6)
  assert np.isfinite(oracle[0]) and learned[0] != learned[1]
  with pytest.raises(ValueError, match="text_intersection"):
    loss_fn(dict(outputs, **first), {}, oracle_masks=True)
  with pytest.raises(ValueError, match="exclude each other"):
    loss_fn(dict(outputs, **first, random_mask_rng=jax.random.PRNGKey(0)), batch, oracle_masks=True)
