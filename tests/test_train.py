"""End-to-end training: metrics, evaluations recomputed independently, checkpoints, bit-identical
resume, non-finite loss, truncated checkpoints (more faults in test_faults.py)."""

import json
import os
import shutil

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
import recall_reference

from configs import clip
from mmret import checkpoint as ckpt_lib
from mmret import registry, train
from mmret import step as step_lib
from mmret.losses.contrastive import clip_loss

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def data_dir(world_data_dir):
  return world_data_dir


def _config(data_dir, **overrides):
  config = clip.get_config("steps=6")
  # shard_map here; the pmap mapping's runs, preemption and resumption are tested through real
  # processes in test_faults.py.
  config.mapping = "shard_map"
  config.model.image.depth = config.model.text.depth = 1  # compiles faster, same code paths
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


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(x) for x in f]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  """(config, workdir, final metrics) of a 6-step CLIP run with evaluations, shared by the tests
  that read a finished run (each works on a copy when it changes the run)."""
  config = _config(data_dir)
  workdir = str(tmp_path_factory.mktemp("finished"))
  return config, workdir, train.run(config, workdir)


def _copy(run_dir, tmp_path):
  copy = str(tmp_path / "copy")
  shutil.copytree(run_dir, copy)
  return copy


def test_run_writes_metrics_tensorboard_and_checkpoints(finished_run, tmp_path):
  config, workdir, final = finished_run
  lines = _lines(workdir)
  # One line per training step, then the final evaluations' line at the last step.
  train_lines = [x for x in lines if "loss" in x]
  eval_lines = [x for x in lines if "loss" not in x]
  assert [x["step"] for x in train_lines] == list(range(1, 7))
  assert [x["step"] for x in eval_lines] == [6]
  assert train_lines[-1]["loss"] == final["loss"] and train_lines[-1]["lr"] == final["lr"]
  # Throughput is measured from the second step on (the first one compiles).
  assert "examples_per_sec_per_device" not in train_lines[0]
  assert all(x["examples_per_sec_per_device"] > 0 for x in train_lines[1:])
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  checkpoints = os.listdir(os.path.join(workdir, "checkpoints"))
  assert sorted(int(s) for s in checkpoints if s.isdigit()) == [3, 6]
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    assert json.load(f) == final

  # The evaluation reports what the trained model's embeddings give, recomputed here in numpy.
  _, params = _params(workdir, config)
  expected = recall_reference.trained_caption5_recall(
      train.Setup(config).predict,
      params,
      config.input,
      "mmret_world/tiny",
      "caption5",
      config.input.data_dir,
  )
  for key, value in expected.items():
    assert eval_lines[0][f"eval/caption5/{key}"] == pytest.approx(value, abs=1e-6), key
  assert "eval/universal/local/average" in eval_lines[0]

  # Launched again, the finished run resumes at its last step: no training, evaluations again,
  # whose line replaces the first run's (each step once in metrics.jsonl).
  again_dir = _copy(workdir, tmp_path)
  again = train.run(config, again_dir)
  lines = _lines(again_dir)
  assert [x["step"] for x in lines if "loss" in x] == list(range(1, 7))
  assert [x["step"] for x in lines if "loss" not in x] == [6]
  assert again["eval/caption5/rsum"] == final["eval/caption5/rsum"]


def _interrupted_then_resumed(config, workdir, monkeypatch):
  """Runs ``config``, crashing while moving the 5th batch to the devices (checkpoint 3 exists,
  steps 4.. do not), then launches it again."""
  real_put_batch = step_lib.DeviceMapping.put_batch
  calls = {"n": 0}

  def crashing_put_batch(self, batch):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt("simulated preemption")
    return real_put_batch(self, batch)

  monkeypatch.setattr(step_lib.DeviceMapping, "put_batch", crashing_put_batch)
  with pytest.raises(KeyboardInterrupt):
    train.run(config, workdir)
  monkeypatch.setattr(step_lib.DeviceMapping, "put_batch", real_put_batch)
  assert _params(workdir, config)[0] == 3
  train.run(config, workdir)


def test_interrupted_and_resumed_run_is_bit_identical(
    finished_run, tmp_path, data_dir, monkeypatch
):
  config, straight, _ = finished_run
  config = _config(data_dir)
  config.evals = {}  # evaluations change no parameter
  resumed = str(tmp_path / "resumed")
  _interrupted_then_resumed(config, resumed, monkeypatch)

  step_a, params_a = _params(straight, config)
  step_b, params_b = _params(resumed, config)
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  # Step 4 ran before the crash and again after resuming from checkpoint 3: its first line was
  # dropped on resuming, each step is in metrics.jsonl once.
  assert [line["step"] for line in _lines(resumed) if "loss" in line] == [1, 2, 3, 4, 5, 6]


def _nan_when_temperature_moves(outputs, batch, *, axis_name=None, tolerance=0.05):
  """CLIP loss that turns NaN once the learnable temperature has moved (after a few steps)."""
  loss, metrics = clip_loss(outputs, batch, axis_name=axis_name)
  moved = jnp.abs(outputs["logit_scale"] - jnp.log(1 / 0.07)) > tolerance
  return jnp.where(moved, jnp.nan, loss), metrics


def test_non_finite_loss_stops_and_names_step_and_checkpoint(tmp_path, data_dir, monkeypatch):
  monkeypatch.setitem(registry.LOSSES, "test_nan_after_scale_moves", _nan_when_temperature_moves)
  config = _config(data_dir, ckpt_every=1, mapping="shard_map")
  config.total_steps = 20
  config.optim.lr, config.optim.warmup_steps = 0.02, 1
  config.evals = {}
  # NaN from the step after the temperature first moves.
  config.loss = ml_collections.ConfigDict(
      {"name": "test_nan_after_scale_moves", "tolerance": 0.005}
  )
  with pytest.raises(train.NonFiniteLossError, match=r"loss is nan at step (\d+)") as err:
    train.run(config, str(tmp_path))
  bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
  assert bad_step > 1
  assert os.path.join(str(tmp_path), "checkpoints", str(bad_step - 1)) in str(err.value)
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert max(saved) == bad_step - 1  # nothing past the bad step was checkpointed


def test_truncated_checkpoint_is_moved_aside_and_named(finished_run, tmp_path, caplog):
  config, workdir, _ = finished_run
  workdir = _copy(workdir, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "6")
  data_files = [
      os.path.join(r, f)
      for r, _, fs in os.walk(os.path.join(step_dir, "state"))
      for f in fs
      if os.path.getsize(os.path.join(r, f)) > 64
  ]
  assert data_files
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(16)
  # Read directly, it is an error naming it (a run moving a corrupt checkpoint aside and
  # resuming from the previous one is test_faults.py's).
  with pytest.raises(ckpt_lib.CheckpointError, match=step_dir):
    _params(workdir, config)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  setup = train.Setup(config)
  step, _ = checkpointer.restore_latest_good(
      setup.abstract_state(step_lib.DeviceMapping("shard_map"))
  )
  checkpointer.close()
  assert step == 3 and step_dir in caplog.text and "is corrupt" in caplog.text
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "corrupt-6"]


def test_batch_size_not_divisible_by_devices_is_an_error(tmp_path, data_dir):
  config = _config(data_dir)
  config.input.batch_size = 12
  with pytest.raises(ValueError, match="input.batch_size=12"):
    train.run(config, str(tmp_path))
