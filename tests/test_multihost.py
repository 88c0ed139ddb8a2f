"""Multi-host: 2 processes x 4 CPU devices (gloo collectives), started by launch/slurm_gpu.sbatch
under an emulated SLURM job of 2 nodes (both on this machine, each with 4 fake devices standing in
for its GPUs, one task per node with --local_devices=all) from another directory with the config's
absolute path, train like 1 process x 8 devices (shard_map here; the pmap mapping across 2
processes is tested with preemption in test_faults.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import clip
from mmret import train
from mmret.data import sources
from test_launchers import run_sbatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(workdir, data_dir, mapping, config):
  return [
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
  # Submitted from another directory with the config's absolute path (configs import only the
  # installed package).
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  mapping, config_path = "shard_map", os.path.join(REPO, "configs", "clip.py")
  multi = str(tmp_path / f"multi_{mapping}")
  # sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 launch/slurm_gpu.sbatch ...
  result = run_sbatch(
      ["--local_devices=all"] + _args(multi, data_dir, mapping, config_path),
      nodes=2,
      ntasks_per_node=1,
      gpus_per_node=4,
      submit_dir=elsewhere,
      bin_dir=tmp_path / "slurm_bin",
  )
  logs = result.stdout + result.stderr
  assert result.returncode == 0, logs[-6000:]
  for i, node in enumerate(["localhost", "127.0.0.1"]):
    assert f"JAX process {i}/2, 4 local / 8 global devices" in logs, logs[-6000:]
    assert f"SLURM task {i}/2 on node {node} (node {i}/2, local task 0/1): 4 local devices" in logs
  # Same global batch (each process feeds its half), same collectives: the same losses (the two
  # mappings agree to float32 rounding).
  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=2e-5, err_msg=mapping)
  assert sorted(os.listdir(os.path.join(multi, "checkpoints")))[:1] == ["3"]
