"""Train-step throughput: examples/s of the contrastive (CLIP) train step.

Named sizes, per device mapping:

  python benchmarks/step.py                                  # tiny,small,base x pmap,shard_map
  python benchmarks/step.py --sizes=base --batch_size=256 --image_size=224   # on an accelerator
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/step.py --sizes=tiny

open_clip's architecture at explicit shapes (pre-norm, exact GELU, ``ln_pre``, causal text pooled at
the end token, class-token image pooling, bias-free projections), the flags of
``../shared/peer/peer_openclip_step.py`` so both run at identical shapes, one JSON line:

  taskset -c 1 python benchmarks/step.py --threads=1 --json --image-size=32 --patch-size=8 \\
      --vision-width=64 --vision-layers=2 --vision-heads=2 --text-ctx=16 --vocab=1000 \\
      --text-width=64 --text-layers=2 --text-heads=2 --embed-dim=64 --batch=64 --steps=20 --warmup=5

``--first_step`` also times a fresh process from start to its first finished step twice, with an
empty persistent compilation cache (cold) and again with the cache the first one filled (warm).

Random inputs (no input pipeline), so this measures the step alone.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Default input sizes per model size: what each is meant to train on.
DEFAULT_IMAGE_SIZE = {"tiny": 32, "small": 224, "base": 224}
DEFAULT_TEXT_LEN = {"tiny": 16, "small": 32, "base": 77}
VOCAB = 49408  # CLIP's BPE vocabulary
OPENCLIP_SHAPE = (
    "image_size",
    "patch_size",
    "vision_width",
    "vision_layers",
    "vision_heads",
    "text_ctx",
    "text_width",
    "text_layers",
    "text_heads",
    "embed_dim",
)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add = parser.add_argument
  add("--sizes", default="tiny,small,base", help="named sizes (ignored with the shape flags)")
  add("--mappings", default=None, help="default: pmap,shard_map; shard_map with the shape flags")
  add("--batch", "--batch_size", dest="batch", type=int, default=None, help="global batch")
  add("--image-size", "--image_size", dest="image_size", type=int, default=None)
  add("--text-ctx", "--text_len", dest="text_ctx", type=int, default=None)
  for name in OPENCLIP_SHAPE[1:]:
    if name != "text_ctx":
      add(f"--{name.replace('_', '-')}", dest=name, type=int, default=None)
  add("--vocab", type=int, default=None, help=f"text vocabulary (default {VOCAB})")
  add("--steps", type=int, default=None, help="timed steps (default 20; 3 on CPU for small/base)")
  add("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
  add("--threads", type=int, default=None, help="CPU threads of XLA (1: single-threaded)")
  add("--dtype", default="float32", choices=["float32", "bfloat16"])
  add("--joint_kind", default="fusion", choices=["fusion", "encoder"])
  add("--json", action="store_true", help="one JSON line per case")
  add("--first_step", action="store_true", help="also time a cold and a warm process start")
  add("--compilation_cache", default=None, help=argparse.SUPPRESS)  # set by --first_step
  return parser.parse_args(argv)


def configure_threads(threads):
  """XLA's CPU thread use, set before JAX starts (one thread: no Eigen or intra-op pool)."""
  if threads is None:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if threads == 1:
    flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  else:
    flags += f" intra_op_parallelism_threads={threads}"
  os.environ["XLA_FLAGS"] = flags.strip()


def random_batch(n, image_size, text_len, vocab, seed=0):
  import numpy as np  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  mask = np.arange(text_len)[None] < rng.integers(4, text_len + 1, size=n)[:, None]
  return {
      # uint8 pixels, as training's batches carry them (the step normalises them).
      "image": rng.integers(0, 256, size=(n, image_size, image_size, 3)).astype(np.uint8),
      "text_ids": rng.integers(1, vocab, size=(n, text_len)).astype(np.int32),
      "text_mask": mask,
  }


def step_config(size, batch_size, image_size, text_len, dtype, joint_kind, shape=None):
  """The CLIP recipe's base config at the benchmarked shapes; ``shape`` (the open_clip flags)
  replaces the named size's towers by open_clip's architecture at those shapes."""
  from mmret import config_lib  # noqa: PLC0415

  config = config_lib.base_config(size=size, steps=1000)
  config.model.dtype = dtype
  config.model.joint_kind = joint_kind
  config.input.image_size, config.input.max_text_len = image_size, text_len
  config.input.batch_size = batch_size
  if shape:
    model = config.model
    model.image.update(
        width=shape["vision_width"],
        depth=shape["vision_layers"],
        heads=shape["vision_heads"],
        mlp_dim=4 * shape["vision_width"],
        patch_size=shape["patch_size"],
        ln_pre=True,
        activation="gelu",
        ln_eps=1e-5,
    )
    model.text.update(
        width=shape["text_width"],
        depth=shape["text_layers"],
        heads=shape["text_heads"],
        mlp_dim=4 * shape["text_width"],
        activation="gelu",
        ln_eps=1e-5,
    )
    model.embed_dim = shape["embed_dim"]
    model.image_pool, model.text_pool, model.text_causal = "cls", "eos", True
  return config


def measure(config, mapping_kind, vocab, steps, warmup):
  import jax  # noqa: PLC0415

  from mmret import train  # noqa: PLC0415
  from mmret import step as step_lib  # noqa: PLC0415

  batch_size = config.input.batch_size
  image_size, text_len = config.input.image_size, config.input.max_text_len
  setup = train.Setup(config, vocab_size=vocab)  # the model, optimizer and step of training
  batch = random_batch(batch_size, image_size, text_len, vocab)
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
      "mapping": mapping_kind,
      "devices": jax.device_count(),
      "platform": jax.devices()[0].device_kind,
      "params_M": n_params / 1e6,
      "batch": batch_size,
      "image": image_size,
      "text_len": text_len,
      "dtype": config.model.dtype,
      "step_ms": 1e3 * elapsed / steps,
      "examples_per_s": batch_size * steps / elapsed,
      "examples_per_s_per_device": batch_size * steps / elapsed / jax.device_count(),
      "warmup_s": compile_s,
  }


def first_step_times(argv):
  """(cold, warm) seconds from process start to the first finished step of this benchmark run
  with the same arguments, in fresh processes sharing an initially empty compilation cache."""
  passed = [a for a in argv if a not in ("--first_step", "--json")]
  with tempfile.TemporaryDirectory() as cache:
    times = []
    for _ in range(2):
      command = [sys.executable, os.path.abspath(__file__), *passed, "--steps=1", "--warmup=1"]
      command += ["--json", f"--compilation_cache={cache}"]
      start = time.perf_counter()
      subprocess.run(command, check=True, capture_output=True, text=True)
      times.append(time.perf_counter() - start)
  return tuple(times)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  configure_threads(args.threads)
  import jax  # noqa: PLC0415  (after XLA_FLAGS are final)

  if args.compilation_cache:
    from mmret import runtime  # noqa: PLC0415

    runtime.enable_compilation_cache(args.compilation_cache)
  on_cpu = jax.devices()[0].platform == "cpu"
  shape = {k: getattr(args, k) for k in OPENCLIP_SHAPE}
  # --image-size and --text-ctx also size the named models; the architecture flags go together.
  given = [k for k, v in shape.items() if v is not None and k not in ("image_size", "text_ctx")]
  if given and any(v is None for v in shape.values()):
    missing = sorted(k.replace("_", "-") for k in OPENCLIP_SHAPE if shape[k] is None)
    sys.exit(f"error: the open_clip shape flags go together; missing: --{', --'.join(missing)}")
  sizes = ["tiny"] if given else args.sizes.split(",")
  mappings = (args.mappings or ("shard_map" if given else "pmap,shard_map")).split(",")
  vocab = args.vocab or VOCAB
  if not args.json:
    print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
  first_step = first_step_times(argv) if args.first_step else None
  for size in sizes:
    default_batch = 64 if size == "tiny" else (16 if on_cpu else 256)
    batch = args.batch or default_batch
    batch = max(batch // jax.device_count(), 1) * jax.device_count()
    steps = args.steps or (3 if on_cpu and size != "tiny" else 20)
    image_size = args.image_size or DEFAULT_IMAGE_SIZE[size]
    text_len = args.text_ctx or DEFAULT_TEXT_LEN[size]
    config = step_config(
        size, batch, image_size, text_len, args.dtype, args.joint_kind, shape if given else None
    )
    for kind in mappings:
      r = measure(config, kind, vocab, steps, args.warmup)
      r["size"] = "openclip_shape" if given else size
      r["threads"] = args.threads
      if first_step:
        r["cold_first_step_s"], r["warm_first_step_s"] = first_step
      if args.json:
        print(json.dumps(r), flush=True)
        continue
      print(
          f"{r['size']:5s} {r['mapping']:9s} devices={r['devices']} ({r['platform']}) "
          f"params={r['params_M']:.1f}M batch={r['batch']} image={r['image']} "
          f"dtype={r['dtype']} step={r['step_ms']:.1f}ms "
          f"examples/s={r['examples_per_s']:.1f} "
          f"per_device={r['examples_per_s_per_device']:.1f} (warmup {r['warmup_s']:.1f}s)"
          + (
              f" first step: cold {first_step[0]:.1f}s, warm {first_step[1]:.1f}s"
              if first_step
              else ""
          ),
          flush=True,
      )


if __name__ == "__main__":
  main()
