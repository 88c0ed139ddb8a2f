"""Model-FLOPs utilisation of the contrastive train step (CLIP ViT-B/16 in bfloat16 by default).

  python benchmarks/mfu.py                                   # ViT-B/16, bf16, dense and chunked loss
  python benchmarks/mfu.py --batch=512 --loss_impls=chunked  # one case
  python benchmarks/mfu.py --peak_tflops=197                 # a device kind not in PEAK_TFLOPS

FLOPs per step are XLA's cost analysis of the compiled step (per device: forward, backward,
optimizer update, loss), divided by the measured step time and the device's peak dense bf16
throughput (``PEAK_TFLOPS`` by device kind, or ``--peak_tflops``). The analytic count of the towers
alone (6 x parameters x tokens, plus attention) is printed beside it as a cross-check. One JSON
line per loss implementation. On a CPU (no known peak) the MFU is null unless ``--peak_tflops`` is
given; use a small ``--batch`` there.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import random_batch, step_config  # noqa: E402  (the step benchmark's inputs and config)

# Peak dense bf16 TFLOP/s per device (chip), by a substring of ``jax.Device.device_kind``; the
# first match wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("TPU v6", 918.0),  # Trillium (v6e)
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L4", 121.0),
)


def peak_tflops(device_kind: str):
  for name, peak in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def analytic_flops(config, batch: int) -> float:
  """6 x (matmul parameters x tokens) + attention (12 x layers x tokens^2 x width) per tower, for
  one global step (forward + backward), the usual transformer estimate."""
  from mmret.models import sizes  # noqa: PLC0415

  arch = sizes.resolve(config.model)
  image, text = arch["image"], arch["text"]
  patches = (config.input.image_size // image["patch_size"]) ** 2 + 1
  total = 0.0
  for tower, tokens in ((image, patches), (text, config.input.max_text_len)):
    width, mlp = tower["width"], tower["mlp_dim"]
    per_layer = 4 * width * width + 2 * width * mlp  # QKV + output, MLP in and out
    total += 6 * tower["depth"] * per_layer * tokens + 12 * tower["depth"] * tokens**2 * width
  total += 6 * 3 * image["patch_size"] ** 2 * image["width"] * (patches - 1)  # patch embedding
  return total * batch


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add = parser.add_argument
  add("--size", default="clip_vit_b16", help="a named model size (mmret/models/sizes.py)")
  add("--batch", type=int, default=None, help="global batch (default 256 per device; 8 on CPU)")
  add("--image_size", type=int, default=224)
  add("--text_len", type=int, default=77)
  add("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  add("--loss_impls", default="dense,chunked", help="loss.impl values to measure")
  add("--block_size", type=int, default=512, help="the chunked loss's block size")
  add("--steps", type=int, default=None, help="timed steps (default 10; 2 on CPU)")
  add("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
  add("--peak_tflops", type=float, default=None, help="per-device peak (overrides the table)")
  return parser.parse_args(argv)


def measure(config, vocab: int, steps: int, warmup: int) -> dict:
  import jax  # noqa: PLC0415

  from mmret import step as step_lib  # noqa: PLC0415
  from mmret import train  # noqa: PLC0415

  setup = train.Setup(config, vocab_size=vocab)
  mapping = step_lib.DeviceMapping("shard_map")  # one jitted SPMD program: one cost analysis
  state = mapping.put_state(setup.init_state(config, mapping))
  batch = mapping.put_batch(
      random_batch(
          config.input.batch_size, config.input.image_size, config.input.max_text_len, vocab
      )
  )
  fn = mapping.compile(setup.step_body())
  compiled = fn.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))  # per device: the SPMD program of one device
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  block_each = jax.devices()[0].platform == "cpu" and jax.device_count() > 1
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
    if block_each:
      jax.block_until_ready(metrics)
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - start) / steps
  return {"flops_per_device": flops, "step_s": step_s}


def main(argv=None):
  args = parse_args(argv)
  import jax  # noqa: PLC0415

  from mmret.models import sizes  # noqa: PLC0415

  if args.size not in sizes.SIZES:
    sys.exit(f"error: unknown --size {args.size!r}; known: {', '.join(sorted(sizes.SIZES))}")
  devices = jax.device_count()
  kind = jax.devices()[0].device_kind
  on_cpu = jax.devices()[0].platform == "cpu"
  batch = args.batch or (8 if on_cpu else 256 * devices)
  batch = max(batch // devices, 1) * devices
  steps = args.steps or (2 if on_cpu else 10)
  peak = args.peak_tflops or peak_tflops(kind)
  for impl in args.loss_impls.split(","):
    config = step_config(
        args.size, batch, args.image_size, args.text_len, args.dtype, "fusion", shape=None
    )
    config.loss.impl, config.loss.block_size = impl, args.block_size
    result = measure(config, 49408, steps, args.warmup)
    achieved = result["flops_per_device"] / result["step_s"]
    analytic = analytic_flops(config, batch) / devices
    print(
        json.dumps(
            {
                "size": args.size,
                "loss_impl": impl,
                "dtype": args.dtype,
                "device_kind": kind,
                "devices": devices,
                "global_batch": batch,
                "step_ms": round(1e3 * result["step_s"], 2),
                "examples_per_s": round(batch / result["step_s"], 1),
                "xla_tflops_per_step_per_device": result["flops_per_device"] / 1e12,
                "analytic_tflops_per_step_per_device": analytic / 1e12,
                "achieved_tflops_per_device": achieved / 1e12,
                "peak_tflops_per_device": peak,
                "mfu": achieved / (peak * 1e12) if peak else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
  main()
