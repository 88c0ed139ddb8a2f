"""Train-step throughput: examples/s of the contrastive step per model size and device mapping.

  python benchmarks/step.py                                  # tiny,small,base x pmap,shard_map
  python benchmarks/step.py --sizes=base --batch_size=256 --image_size=224   # on an accelerator
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/step.py --sizes=tiny

Random inputs (no input pipeline), so this measures the step alone. Prints one line per case.
"""

import argparse
import time

import jax
import numpy as np

from mmret import config_lib, train
from mmret import step as step_lib

# Default input sizes per model size: what each is meant to train on.
DEFAULT_IMAGE_SIZE = {"tiny": 32, "small": 224, "base": 224}
DEFAULT_TEXT_LEN = {"tiny": 16, "small": 32, "base": 77}
VOCAB = 49408  # CLIP's BPE vocabulary


def random_batch(n, image_size, text_len, vocab, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.arange(text_len)[None] < rng.integers(4, text_len + 1, size=n)[:, None]
  return {
      "image": rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32),
      "text_ids": rng.integers(1, vocab, size=(n, text_len)).astype(np.int32),
      "text_mask": mask,
  }


def step_config(size, batch_size, image_size, text_len, dtype, joint_kind):
  """The CLIP recipe's base config at the benchmarked shapes."""
  config = config_lib.base_config(size=size, steps=1000)
  config.model.dtype = dtype
  config.model.joint_kind = joint_kind
  config.input.image_size, config.input.max_text_len = image_size, text_len
  config.input.batch_size = batch_size
  return config


def measure(size, mapping_kind, batch_size, image_size, text_len, steps, warmup, dtype, joint_kind):
  config = step_config(size, batch_size, image_size, text_len, dtype, joint_kind)
  setup = train.Setup(config, vocab_size=VOCAB)  # the model, optimizer and step of training
  batch = random_batch(batch_size, image_size, text_len, VOCAB)
  mapping = step_lib.DeviceMapping(mapping_kind)
  state = mapping.put_state(setup.init_state(config, mapping))
  fn = mapping.compile(setup.step_body())
  device_batch = mapping.put_batch(batch)
  # One step in flight at a time on multi-device CPU (collective rendezvous); elsewhere the
  # device queue is kept full and only the last step is waited for.
  block_each = jax.devices()[0].platform == "cpu" and jax.device_count() > 1
  t0 = time.perf_counter()
  for _ in range(warmup):
    state, metrics = fn(state, device_batch)
    jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state, device_batch)
    if block_each:
      jax.block_until_ready(metrics)
  jax.block_until_ready(state)
  elapsed = time.perf_counter() - t0
  n_params = sum(x.size for x in jax.tree.leaves(mapping.get_state(state).params))
  return {
      "size": size,
      "mapping": mapping_kind,
      "devices": jax.device_count(),
      "platform": jax.devices()[0].device_kind,
      "params_M": n_params / 1e6,
      "batch": batch_size,
      "image": image_size,
      "text_len": text_len,
      "dtype": dtype,
      "step_ms": 1e3 * elapsed / steps,
      "examples_per_s": batch_size * steps / elapsed,
      "examples_per_s_per_device": batch_size * steps / elapsed / jax.device_count(),
      "warmup_s": compile_s,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="tiny,small,base")
  parser.add_argument("--mappings", default="pmap,shard_map")
  parser.add_argument(
      "--batch_size",
      type=int,
      default=None,
      help="global batch (default: 64 tiny, 16 small/base on CPU, 256 elsewhere)",
  )
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--text_len", type=int, default=None)
  parser.add_argument(
      "--steps", type=int, default=None, help="timed steps (default 20, 3 on CPU " "for small/base)"
  )
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--joint_kind", default="fusion", choices=["fusion", "encoder"])
  args = parser.parse_args()
  on_cpu = jax.devices()[0].platform == "cpu"
  print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for size in args.sizes.split(","):
    default_batch = 64 if size == "tiny" else (16 if on_cpu else 256)
    batch = args.batch_size or default_batch
    batch = max(batch // jax.device_count(), 1) * jax.device_count()
    steps = args.steps or (3 if on_cpu and size != "tiny" else 20)
    for kind in args.mappings.split(","):
      r = measure(
          size,
          kind,
          batch,
          args.image_size or DEFAULT_IMAGE_SIZE[size],
          args.text_len or DEFAULT_TEXT_LEN[size],
          steps,
          args.warmup,
          args.dtype,
          args.joint_kind,
      )
      print(
          f"{r['size']:5s} {r['mapping']:9s} devices={r['devices']} ({r['platform']}) "
          f"params={r['params_M']:.1f}M batch={r['batch']} image={r['image']} "
          f"dtype={r['dtype']} step={r['step_ms']:.1f}ms "
          f"examples/s={r['examples_per_s']:.1f} "
          f"per_device={r['examples_per_s_per_device']:.1f} (warmup {r['warmup_s']:.1f}s)",
          flush=True,
      )


if __name__ == "__main__":
  main()
