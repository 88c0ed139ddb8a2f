"""Multi-host: 2 processes x 4 CPU devices (gloo collectives), started by launch/local.sh from
another directory with the config's absolute path, train like 1 process x 8 devices (shard_map
here; the pmap mapping across 2 processes is tested with preemption in test_faults.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import clip
from mmret import train
from mmret.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, data_dir, mapping, config="configs/clip.py"):
  return [
      sys.executable,
      "-m",
      "mmret.main",
      f"--config={config}:steps=3,evals=false",
      f"--workdir={workdir}",
      f"--config.input.data_dir={data_dir}",
      "--config.input.batch_size=16",
      "--config.log_every=1",
      f"--config.mapping={mapping}",
      "--config.model.image.depth=1",  # one block per tower: compiles faster, same code paths
      "--config.model.text.depth=1",
  ]


def _losses(workdir):
  return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, world_data_dir):
  data_dir = world_data_dir
  sources.load_builder("mmret_world/tiny", data_dir)  # prepared once, read by every process
  # The reference: this process, whose 8 devices take the whole global batch.
  config = clip.get_config("steps=3,evals=false")
  config.input.data_dir, config.input.batch_size, config.log_every = data_dir, 16, 1
  config.model.image.depth = config.model.text.depth = 1
  single = str(tmp_path / "single")
  train.run(config, single)
  # Launched from another working directory with the config's absolute path (configs import only
  # the installed package).
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  launches = {"shard_map": (os.path.join(REPO, "configs", "clip.py"), elsewhere)}
  for mapping, (config_path, cwd) in launches.items():
    multi = str(tmp_path / f"multi_{mapping}")
    launcher = [os.path.join(REPO, "launch", "local.sh"), "2", "4", "--"]
    result = subprocess.run(
        launcher + _command(multi, data_dir, mapping, config_path),
        cwd=cwd,
        env=dict(os.environ),
        timeout=600,
        capture_output=True,
        text=True,
    )
    logs = "".join(
        open(os.path.join(multi, f"proc{i}.log")).read()[-3000:]
        for i in range(2)
        if os.path.exists(os.path.join(multi, f"proc{i}.log"))
    )
    assert result.returncode == 0, result.stderr + logs
    assert "JAX process 1/2, 4 local / 8 global devices" in logs
    # Same global batch (each process feeds its half), same collectives: the same losses (the two
    # mappings agree to float32 rounding).
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=2e-5, err_msg=mapping)
    assert sorted(os.listdir(os.path.join(multi, "checkpoints")))[:1] == ["3"]
