"""The frozen-tower feature cache: when it applies, what it stores, and that training and evaluation
from cached tower outputs give what the towers' own forward pass gives."""

import json
import os

import jax
import numpy as np
import pytest

from configs import clip, solar
from mmret import feature_cache, train
from mmret import step as step_lib
from mmret.data import pipeline
from mmret.models.retrieval import IMAGE_FEATURES, TEXT_FEATURES

pytestmark = [pytest.mark.slow]

FREEZE = r"^(image|text)_tower/"


def _config(data_dir, cache_dir, *, recipe=clip, arg="steps=4", **input_overrides):
  config = recipe.get_config(arg)
  config.input.data_dir = data_dir
  config.input.feature_cache_dir = str(cache_dir)
  config.input.batch_size = 16
  config.optim.freeze = FREEZE
  config.optim.warmup_steps = 1
  config.log_every = 1
  config.ckpt_every = 0
  config.input.update(input_overrides)
  for tower in ("image", "text", "joint"):  # one block each: compiles faster, same code paths
    config.model[tower].depth = 1
  return config


def _tower_outputs(setup, params, batch, input_cfg):
  """The towers' own forward pass on a pixel/token batch (independent of the cache's code),
  with the uint8 pixels normalised on the host."""
  pixels = (batch["image"] / 255.0 - np.asarray(input_cfg.mean)) / np.asarray(input_cfg.std)
  image = setup.model.apply(
      {"params": params},
      pixels.astype(np.float32),
      method=lambda m, x: m.image_tower(x, train=False),
  )
  text = setup.model.apply(
      {"params": params},
      batch["text_ids"],
      batch["text_mask"],
      method=lambda m, i, k: m.text_tower(i, k, train=False),
  )
  return {
      IMAGE_FEATURES["pooled"]: image["pooled"],
      IMAGE_FEATURES["tokens"]: image["tokens"],
      TEXT_FEATURES["pooled"]: text["pooled"],
      TEXT_FEATURES["tokens"]: text["tokens"],
  }


def test_blockers_name_each_unmet_condition(world_data_dir, tmp_path):
  config = _config(world_data_dir, tmp_path)
  setup = train.Setup(config)
  assert feature_cache.blockers(config, setup.frozen_mask) == []
  assert feature_cache.enabled(config, setup.frozen_mask)

  config.optim.freeze = r"^image_tower/"
  reasons = feature_cache.blockers(config, train.Setup(config).frozen_mask)
  assert len(reasons) == 1 and "text_tower" in reasons[0] and "image_tower'" not in reasons[0]
  config.optim.freeze = FREEZE
  config.model.dropout = 0.1
  config.input.augment.flip = True
  reasons = feature_cache.blockers(config, setup.frozen_mask)
  assert any("dropout" in r for r in reasons) and any("augment" in r for r in reasons)
  assert not feature_cache.enabled(config, setup.frozen_mask)  # 'auto' falls back
  config.input.feature_cache = "on"
  with pytest.raises(ValueError, match="dropout.*augment"):
    feature_cache.enabled(config, setup.frozen_mask)
  config.input.feature_cache = "off"
  assert not feature_cache.enabled(config, setup.frozen_mask)
  config.input.feature_cache = "sometimes"
  with pytest.raises(ValueError, match="sometimes"):
    feature_cache.enabled(config, setup.frozen_mask)


def test_cached_batches_hold_the_towers_outputs_and_the_same_stream(world_data_dir, tmp_path):
  config = _config(world_data_dir, tmp_path)
  setup = train.Setup(config)
  params = jax.jit(lambda k: setup.model.init(k, setup.example)["params"])(jax.random.PRNGKey(3))
  towers = feature_cache.TowerPass(setup.model, params, config.input)
  stores = feature_cache.for_training(config, towers)
  (directory,) = [s.directory for s in stores]
  manifest = json.load(open(os.path.join(directory, feature_cache.MANIFEST)))
  assert manifest["split"] == "train" and manifest["towers"] == towers.digest
  assert not [d for d in os.listdir(tmp_path) if "staging" in d]

  plain = pipeline.make_train_iterator(config.input, seed=5)
  cached = pipeline.make_train_iterator(config.input, seed=5, features=stores)
  for _ in range(3):
    a, b = next(plain), next(cached)
    assert "image" not in b and "image" in a
    for key in ("text_ids", "text_mask", "text_intersection", "image_labels"):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    expected = _tower_outputs(setup, params, a, config.input)
    for key, value in expected.items():
      np.testing.assert_allclose(b[key], value, rtol=1e-5, atol=1e-5, err_msg=key)

  # A second call finds the cache (no tower pass) and a resumed stream reads the same batches.
  calls = []
  towers.image = lambda *a: calls.append(a)
  assert [s.directory for s in feature_cache.for_training(config, towers)] == [directory]
  assert calls == []
  state = cached.get_state()
  again = pipeline.make_train_iterator(config.input, seed=5, features=stores)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["text_ids"], next(cached)["text_ids"])

  # Different tower weights are a different cache.
  other = jax.tree.map(lambda x: x + 1.0, params)
  (other_store,) = feature_cache.for_training(
      config, feature_cache.TowerPass(setup.model, other, config.input)
  )
  assert other_store.directory != directory


def _step_results(config, state, batch):
  """Parameters and metrics after two steps on ``batch`` (the first one's learning rate is 0)."""
  setup = train.Setup(config)
  step = jax.jit(setup.step_body())
  state, _ = step(state, batch)
  state, metrics = step(state, batch)
  return jax.device_get(state.params), jax.device_get(metrics)


# CLIP's step on cached outputs is checked through whole runs below (losses and evaluations);
# SOLAR's stage 1 reads the cache in its teacher too.
@pytest.mark.parametrize("recipe", ["solar_stage1"])
def test_a_step_on_cached_outputs_equals_the_step_on_pixels(recipe, world_data_dir, tmp_path):
  if recipe == "clip":
    config = _config(world_data_dir, tmp_path)
  else:  # stage 1: its teacher reads the cache instead of a second tower pass
    config = _config(world_data_dir, tmp_path, recipe=solar, arg="stage1_steps=4,stage2_steps=4")
    stages = train.stage_configs(config)
    config = stages[0][1]
    config.optim.freeze = FREEZE
  setup = train.Setup(config)
  mapping = step_lib.DeviceMapping(config.mapping)
  state = setup.init_state(config, mapping)
  state = jax.device_get(state)
  towers = feature_cache.TowerPass(setup.model, state.params, config.input)
  stores = feature_cache.for_training(config, towers)
  plain = next(pipeline.make_train_iterator(config.input, seed=1))
  cached = next(pipeline.make_train_iterator(config.input, seed=1, features=stores))
  params_a, metrics_a = _step_results(config, state, plain)
  params_b, metrics_b = _step_results(config, state, cached)
  assert set(metrics_a) == set(metrics_b)
  for key in metrics_a:
    np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=2e-4, atol=2e-5, err_msg=key)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5), params_a, params_b
  )
  # The frozen towers did not move; something else did.
  for tower in feature_cache.TOWERS:
    jax.tree.map(
        np.testing.assert_array_equal, params_b[tower], jax.device_get(state.params[tower])
    )
  assert not np.allclose(params_b["text_proj"]["kernel"], state.params["text_proj"]["kernel"])


def test_training_and_evaluation_from_the_cache_equal_the_plain_run(world_data_dir, tmp_path):
  """Two short frozen-tower runs with a retrieval evaluation: cache on and off, same results."""
  results = {}
  for mode in ("on", "off"):
    config = _config(world_data_dir, tmp_path / "cache", feature_cache=mode)
    config.evals.universal = dict(
        type="retrieval",
        dataset="mmret_world/tiny",
        split="universal",
        every=0,
        pools=("local",),
        recall_k=5,
        batch_size=32,
    )
    results[mode] = train.run(config, str(tmp_path / mode))
  on, off = results["on"], results["off"]
  assert os.listdir(tmp_path / "cache")  # the run on the cache built one
  assert any(k.startswith("eval/universal/") for k in on)
  assert set(on) == set(off)
  for key, value in off.items():
    if key.startswith("eval/") or key in ("loss", "grad_norm"):
      np.testing.assert_allclose(on[key], value, rtol=1e-3, atol=1e-4, err_msg=key)


def test_the_key_holds_the_vocabulary_not_its_path(tmp_path):
  """A moved checkout (same vocabulary, another path) finds its caches; an edited vocabulary file
  at the same path does not reuse them."""
  input_cfg = pipeline.default_input_config()
  keys = []
  for name, words in (("a", "red\nshoe\n"), ("b", "red\nshoe\n"), ("c", "red\nhat\n")):
    path = tmp_path / name
    path.write_text(words)
    input_cfg.tokenizer = f"word:{path}"
    keys.append(feature_cache._preprocessing(input_cfg))
  assert keys[0] == keys[1]
  assert keys[0] != keys[2]
