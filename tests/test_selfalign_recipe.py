"""The SelfAlign recipe: configs of every variant, packed retrieval vectors, an end-to-end run."""

import json

import jax
import numpy as np
import pytest
import recall_reference

from configs import selfalign
from experiments import selfalign_table
from mmret import registry, train
from mmret.recipes.selfalign import method as selfalign_method


@pytest.fixture(scope="module")
def data_dir(world_data_dir):
  return world_data_dir


def _config(data_dir, arg):
  config = selfalign.get_config(arg)
  config.input.data_dir = data_dir
  return config


@pytest.mark.parametrize("variant", sorted(selfalign.VARIANTS))
def test_every_variant_config_builds(data_dir, variant):
  config = _config(data_dir, f"variant={variant},steps=300,sum_warmup=100")
  concept, context = selfalign.VARIANTS[variant]
  # The method trains with its own loss; config.loss holds that loss's hyper-parameters.
  assert config.method.name == "selfalign" and "name" not in config.loss
  assert config.model.unimodal == "tower" and config.model.joint_kind == "fusion"
  assert (config.loss.concept_weight > 0) == concept and (
      config.model.num_prototypes > 0
  ) == concept
  assert (config.loss.context_weight > 0) == context
  assert config.method.similarity == ("final" if context else "global")
  assert config.evals.caption5.type == "caption5" and config.evals.caption5.split == "caption5"
  stages = train.stage_configs(config)
  assert [name for name, _ in stages] == [selfalign.SUM_STAGE, selfalign.HARDEST_STAGE]
  (_, warm), (_, hard) = stages
  assert (warm.total_steps, warm.loss.max_violation) == (100, False)
  assert (hard.total_steps, hard.loss.max_violation) == (200, True)
  assert hard.optim.lr == pytest.approx(config.optim.lr * selfalign.HARDEST_STAGE_LR_FACTOR)
  setup = train.Setup(hard)
  assert setup.method is registry.method("selfalign")


def test_config_without_warmup_is_one_stage_and_bad_args_are_named():
  config = selfalign.get_config("sum_warmup=0,steps=10")
  assert train.stage_configs(config)[0][0] is None and config.loss.max_violation
  # data=DIR on a real Karpathy import: tests/test_data_arg.py.
  with pytest.raises(FileNotFoundError, match="/no/such/flickr30k"):
    selfalign.get_config("data=/no/such/flickr30k,fold_size=1000")
  with pytest.raises(ValueError, match="variant must be one of .* got 'all'"):
    selfalign.get_config("variant=all")
  with pytest.raises(ValueError, match="sum_warmup=10"):
    selfalign.get_config("sum_warmup=10,steps=10")


@pytest.fixture(scope="module")
def model_run(data_dir):
  """A full-method model at init, a batch with ragged text, and the model's outputs on it."""
  config = _config(data_dir, "variant=both,sum_warmup=0")
  config.input.max_text_len = 12
  setup = train.Setup(config)
  rng = np.random.RandomState(0)
  batch = train.example_batch(config.input, 4)
  batch["image"] = rng.randn(*batch["image"].shape).astype(np.float32)
  batch["text_ids"] = rng.randint(1, 40, batch["text_ids"].shape).astype(np.int32)
  batch["text_mask"] = np.arange(12)[None, :] < np.array([3, 12, 7, 5])[:, None]
  params = jax.jit(setup.model.init)(jax.random.PRNGKey(1), batch)["params"]
  outputs = setup.model.apply({"params": params}, batch)
  return config, setup, params, batch, outputs


def test_predict_vectors_dot_product_is_the_final_similarity(model_run):
  config, setup, params, batch, outputs = model_run
  expected = selfalign_method.selfalign_similarity(
      outputs["z_image"],
      outputs["image_tokens"],
      outputs["z_text"],
      outputs["text_tokens"],
      outputs["text_mask"],
      pooling_temperature=config.method.pooling_temperature,
  )
  # The evaluators embed each modality separately.
  images = setup.predict(params, {"image": batch["image"]})
  texts = setup.predict(params, {"text_ids": batch["text_ids"], "text_mask": batch["text_mask"]})
  scores = np.asarray(images["z_image"] @ texts["z_text"].T)
  assert images["z_image"].shape == (4, 3 * outputs["z_image"].shape[1])
  np.testing.assert_allclose(scores, expected, atol=1e-5)
  # The context terms change the scores: the packed vectors are not the globals alone.
  assert np.abs(scores - np.asarray(outputs["z_image"] @ outputs["z_text"].T)).max() > 1e-3
  joint = selfalign_method.retrieval_outputs(outputs)["z_joint"]
  assert joint.shape == images["z_image"].shape
  np.testing.assert_allclose(np.linalg.norm(joint, axis=-1), 1.0, atol=1e-5)


def test_global_similarity_keeps_the_model_embeddings(model_run):
  *_, outputs = model_run
  predicted = selfalign_method.retrieval_outputs(outputs, similarity="global")
  for key in ("z_image", "z_text", "z_joint"):
    np.testing.assert_array_equal(predicted[key], outputs[key])


def test_method_rejects_bad_settings_and_missing_inputs(model_run):
  _, setup, params, batch, _ = model_run
  with pytest.raises(ValueError, match="similarity"):
    selfalign_method.make_predict(setup.model, similarity="local")
  with pytest.raises(ValueError, match="pooling_temperature"):
    selfalign_method.make_forward(setup.model, pooling_temperature=0.0)
  with pytest.raises(ValueError, match="unimodal='tower'"):
    selfalign_method.make_forward(setup.model.clone(unimodal="joint"))
  forward = selfalign_method.make_forward(setup.model)
  with pytest.raises(KeyError, match="text_tokens"):
    forward(params, {}, {"image": batch["image"]}, rng=jax.random.PRNGKey(0), step=0)
  outputs = forward(params, {}, batch, rng=jax.random.PRNGKey(0), step=0)
  assert outputs["prototypes"].shape == (setup.model.num_prototypes, outputs["z_image"].shape[1])


@pytest.mark.slow
def test_short_run_of_the_full_method_gives_caption5_metrics(tmp_path, data_dir):
  config = _config(data_dir, "variant=both,steps=3,sum_warmup=0")
  config.input.batch_size = 16
  config.input.max_text_len = 16
  config.model.image.depth = config.model.text.depth = 1  # the run checks the plumbing only
  config.log_every = 1
  config.mapping = "shard_map"
  config.loss.num_negatives = 32
  final = train.run(config, str(tmp_path))
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [line for line in lines if "loss" in line]
  assert [line["step"] for line in losses] == [1, 2, 3]
  for line in losses:
    assert line["loss"] == pytest.approx(
        line["loss_vsepp"] + line["loss_concept"] + line["loss_context"], rel=1e-5
    )
  # The reported caption5 metrics are what the trained model's final similarity gives,
  # recomputed in numpy from its packed retrieval vectors; the table's re-scoring is what the
  # global vectors alone give.
  setup, params = train.Setup(config), train.load_params(config, str(tmp_path))
  recall = lambda predict: recall_reference.trained_caption5_recall(  # noqa: E731
      predict, params, config.input, "mmret_world/tiny", "caption5", config.input.data_dir
  )
  for key, value in recall(setup.predict).items():
    assert final[f"eval/caption5/{key}"] == pytest.approx(value, abs=1e-6), key
  rescored = selfalign_table.global_scored_metrics(config, str(tmp_path))
  raw_global = selfalign_method.make_predict(setup.model, similarity="global")
  mean, std = np.asarray(config.input.mean), np.asarray(config.input.std)

  def global_predict(p, batch):  # pixels normalised here, independently of mmret.ops
    if "image" in batch:
      batch = dict(batch, image=((batch["image"] / 255.0 - mean) / std).astype(np.float32))
    return raw_global(p, batch)

  for key, value in recall(global_predict).items():
    assert rescored[f"global_scored/{key}"] == pytest.approx(value, abs=1e-6), key
  assert set(rescored) == {
      key.replace("eval/caption5/", "global_scored/")
      for key in final
      if key.startswith("eval/caption5/")
  }
  assert json.load(open(tmp_path / selfalign_table.GLOBAL_SCORED)) == rescored


def test_table_writes_markdown_and_json(tmp_path):
  metrics = {key: 10.0 for key in selfalign_table.COLUMNS.values()}
  results = {
      variant: [
          dict(metrics, **{selfalign_table.PREFIX + "rsum": 60.0 + seed}) for seed in range(3)
      ]
      for variant in selfalign_table.VARIANT_NAMES
  }
  markdown = selfalign_table.write_table(
      results, str(tmp_path), command="cmd", seconds=90.0, seeds=[0, 1, 2]
  )
  rows = [line for line in markdown.splitlines() if line.startswith("| ")]
  assert len(rows) == 1 + len(selfalign_table.VARIANT_NAMES)
  assert "| both (SelfAlign) | 10.00 ± 0.00" in markdown and "61.00 ± 1.00 |" in markdown
  saved = json.load(open(tmp_path / "selfalign_table.json"))
  assert saved["runs"]["both"][2][selfalign_table.PREFIX + "rsum"] == 62.0
  assert (tmp_path / "selfalign_table.md").read_text() == markdown
