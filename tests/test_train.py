"""End-to-end training: metrics, checkpoints, bit-identical resume, non-finite loss."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip
from mmret import checkpoint as ckpt_lib
from mmret import losses, train
from mmret import step as step_lib
from mmret.losses.contrastive import clip_loss


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def _config(data_dir, **overrides):
  config = clip.get_config("steps=6")
  config.input.data_dir = data_dir
  config.input.batch_size = 16
  config.log_every = 1
  config.ckpt_every = 3
  config.optim.warmup_steps = 2
  config.update(overrides)
  return config


def _params(workdir, config):
  """Step and parameters of the workdir's latest checkpoint, as host arrays."""
  setup = train.Setup(config)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  state = checkpointer.restore(setup.abstract_state(step_lib.DeviceMapping(config.mapping)))
  checkpointer.close()
  return int(state.step), jax.device_get(state.params)


def test_run_writes_metrics_tensorboard_and_checkpoints(tmp_path, data_dir):
  config = _config(data_dir)
  final = train.run(config, str(tmp_path))
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  # One line per training step, then the final evaluations' line at the last step.
  train_lines = [x for x in lines if "loss" in x]
  eval_lines = [x for x in lines if "loss" not in x]
  assert [x["step"] for x in train_lines] == list(range(1, 7))
  assert all(np.isfinite(x["loss"]) for x in train_lines)
  assert [x["step"] for x in eval_lines] == [6]
  assert {"eval/caption5/rsum", "eval/universal/local/average"} <= set(eval_lines[0])
  # Throughput is measured from the second step on (the first one compiles).
  assert all(x["examples_per_sec_per_device"] > 0 for x in train_lines[1:])
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [3, 6]
  assert final["step"] == 6 and json.load(open(tmp_path / "final_metrics.json"))["step"] == 6

  # Launched again, the finished run resumes at its last step: no training, evaluations again.
  again = train.run(config, str(tmp_path))
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [x["step"] for x in lines if "loss" in x] == list(range(1, 7))
  assert [x["step"] for x in lines if "loss" not in x] == [6, 6]
  assert again["eval/caption5/rsum"] == final["eval/caption5/rsum"]


@pytest.mark.parametrize("mapping", ["pmap", "shard_map"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, data_dir, monkeypatch, mapping):
  config = _config(data_dir, mapping=mapping)
  train.run(config, str(tmp_path / "straight"))

  # Crash while moving the 5th batch to the devices: checkpoint 3 exists, steps 4.. do not.
  real_put_batch = step_lib.DeviceMapping.put_batch
  calls = {"n": 0}

  def crashing_put_batch(self, batch):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt("simulated preemption")
    return real_put_batch(self, batch)

  monkeypatch.setattr(step_lib.DeviceMapping, "put_batch", crashing_put_batch)
  with pytest.raises(KeyboardInterrupt):
    train.run(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(step_lib.DeviceMapping, "put_batch", real_put_batch)
  assert _params(str(tmp_path / "resumed"), config)[0] == 3
  train.run(config, str(tmp_path / "resumed"))

  step_a, params_a = _params(str(tmp_path / "straight"), config)
  step_b, params_b = _params(str(tmp_path / "resumed"), config)
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  resumed_steps = [
      line["step"]
      for line in map(json.loads, open(tmp_path / "resumed" / "metrics.jsonl"))
      if "loss" in line
  ]
  # Step 4 ran before the crash and again after resuming from checkpoint 3; history is kept.
  assert resumed_steps == [1, 2, 3, 4, 4, 5, 6]


@losses.register("test_nan_after_scale_moves")
def _nan_when_temperature_moves(outputs, batch, *, axis_name=None, tolerance=0.05):
  """CLIP loss that turns NaN once the learnable temperature has moved (after a few steps)."""
  loss, metrics = clip_loss(outputs, batch, axis_name=axis_name)
  moved = jnp.abs(outputs["logit_scale"] - jnp.log(1 / 0.07)) > tolerance
  return jnp.where(moved, jnp.nan, loss), metrics


def test_non_finite_loss_stops_and_names_step_and_checkpoint(tmp_path, data_dir):
  config = _config(data_dir, ckpt_every=1)
  config.total_steps = 20
  config.optim.lr = 0.02
  config.loss.name = "test_nan_after_scale_moves"
  with pytest.raises(train.NonFiniteLossError, match=r"loss is nan at step (\d+)") as err:
    train.run(config, str(tmp_path))
  bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
  assert bad_step > 1
  assert os.path.join(str(tmp_path), "checkpoints", str(bad_step - 1)) in str(err.value)
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert max(saved) == bad_step - 1  # nothing past the bad step was checkpointed


def test_truncated_checkpoint_is_named(tmp_path, data_dir):
  config = _config(data_dir)
  config.total_steps = 3
  train.run(config, str(tmp_path))
  step_dir = tmp_path / "checkpoints" / "3"
  data_files = [
      os.path.join(r, f)
      for r, _, fs in os.walk(step_dir / "state")
      for f in fs
      if os.path.getsize(os.path.join(r, f)) > 64
  ]
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(16)
  with pytest.raises(ckpt_lib.CheckpointError, match=str(step_dir)):
    train.run(config, str(tmp_path))


def test_batch_size_not_divisible_by_devices_is_an_error(tmp_path, data_dir):
  config = _config(data_dir)
  config.input.batch_size = 12
  with pytest.raises(ValueError, match="input.batch_size=12"):
    train.run(config, str(tmp_path))
