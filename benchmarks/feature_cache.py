"""Shipped-tower GCL fine-tuning with and without the frozen-tower feature cache.

  python -m benchmarks.feature_cache                    # fashion_tiny world, both modes
  python -m benchmarks.feature_cache --world=fashion_small --cached_steps=200 --json

Each mode trains the GCL fine-tuning stage (``configs/gcl.py:towers=shipped``: frozen ImageNet
EfficientNet-Lite0 + all-MiniLM-L6-v2, their adapters and projections trained with the GCL loss)
through the real input pipeline, in its own fresh workdir, and reads the training log's
``examples_per_sec_per_device`` (metrics.jsonl; the compiling first step is never in it). The
cache is built (or found) before the cached run; its build time is printed separately. The plain
run recomputes the towers on every step, so it gets fewer steps. Prints one line per mode
(``--json``: one JSON object per line).
"""

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from configs import gcl
from mmret import feature_cache, train


def finetune_config(world: str, steps: int, batch_size: int, data_dir: str, mode: str):
  config = gcl.get_config(
      f"towers=shipped,world={world},steps={steps},pretrain_steps=1,evals=false"
  )
  config = dict(train.stage_configs(config))[gcl.FINETUNE]
  config.input.batch_size = batch_size
  config.input.feature_cache = mode
  config.log_every = max(1, steps // 10)
  config.ckpt_every = 0
  if data_dir:
    config.input.data_dir = data_dir
  return config


def run(config, workdir: str) -> dict:
  start = time.time()
  train.run(config, workdir, handle_signals=False)
  wall = time.time() - start
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [
        x["examples_per_sec_per_device"]
        for x in map(json.loads, f)
        if "examples_per_sec_per_device" in x
    ]
  return {
      "examples_per_s_per_device": float(np.median(rates)),
      "steps": int(config.total_steps),
      "wall_s": round(wall, 1),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--world", default="fashion_tiny")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--cached_steps", type=int, default=100)
  parser.add_argument("--plain_steps", type=int, default=6)
  parser.add_argument("--modes", default="cached,plain")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()

  for mode in args.modes.split(","):
    if mode not in ("cached", "plain"):
      raise SystemExit(f"--modes: unknown mode {mode!r} (cached | plain)")
    steps = args.cached_steps if mode == "cached" else args.plain_steps
    config = finetune_config(
        args.world, steps, args.batch_size, args.data_dir, "on" if mode == "cached" else "off"
    )
    result = {
        "mode": mode,
        "world": args.world,
        "batch_size": args.batch_size,
        "devices": jax.device_count(),
    }
    if mode == "cached":
      setup = train.Setup(config)
      state = setup.init_state(config, train.step_lib.DeviceMapping(config.mapping))
      start = time.time()
      feature_cache.for_training(
          config, feature_cache.TowerPass(setup.model, state.params, config.input)
      )
      result["cache_ready_s"] = round(time.time() - start, 1)
    with tempfile.TemporaryDirectory() as workdir:
      result.update(run(config, workdir))
    if args.json:
      print(json.dumps(result), flush=True)
    else:
      print(
          f"{mode:6s} {result['examples_per_s_per_device']:9.1f} examples/s/device "
          f"({result['steps']} steps of {args.batch_size}, {result['devices']} device(s), "
          f"{result['wall_s']} s"
          + (f"; cache ready in {result['cache_ready_s']} s" if "cache_ready_s" in result else "")
          + ")",
          flush=True,
      )


if __name__ == "__main__":
  main()
