"""Per-device memory and time of the contrastive losses (value and gradient): dense vs flat-memory.

  python benchmarks/loss_memory.py --devices=8 --batch=16384 --dim=256 --json
  python benchmarks/loss_memory.py --devices=8 --batch=65536 --impl=ring --time_batch=0 --json

For each loss, the loss and its gradient (w.r.t. the embeddings and, where the loss has one, the
learnable ``logit_scale``) run inside ``shard_map`` over ``--devices`` devices, each holding
``batch / devices`` rows, with ``impl="dense"`` and with ``--impl`` (``chunked`` or ``ring``,
``--block_size`` columns per block). Memory is XLA's compiled memory analysis of that program
(temporary + argument bytes per device), so nothing of the global batch is allocated and any batch
can be measured. Agreement and time are measured by running both at ``--time_batch`` (a batch
that fits and runs quickly; 0 skips it): ``max_abs_diff`` is the largest absolute difference of
the value and every gradient entry, ``*_ms`` the median wall time of ``--repeats`` runs.

Prints one line per loss: JSON with ``--json`` (``loss``, ``global_batch``, ``dense_bytes``,
``chunked_bytes``, ``max_abs_diff``, ``dense_ms``, ``chunked_ms``, and ``impl``, ``block_size``,
``time_batch``), else a table row. Without enough accelerators the host CPU is split into
``--devices`` devices (``XLA_FLAGS=--xla_force_host_platform_device_count``, set before jax is
imported).
"""

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8, help="devices the batch is split over")
  parser.add_argument("--batch", type=int, default=16384, help="global batch of the memory figures")
  parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  parser.add_argument("--impl", default="chunked", choices=("chunked", "ring"))
  parser.add_argument("--block_size", type=int, default=512, help="columns per block")
  parser.add_argument(
      "--losses",
      default="clip,gcl,pairwise,vsepp,solar_stage2",
      help="comma-separated: clip, gcl, gcl_drop, pairwise, vsepp, vsepp_sum, solar_stage2",
  )
  parser.add_argument(
      "--time_batch", type=int, default=2048, help="global batch run for max_abs_diff and times"
  )
  parser.add_argument("--repeats", type=int, default=5, help="timed runs (after one warm-up)")
  args = parser.parse_args(argv)
  for name in ("batch", "time_batch"):
    value = getattr(args, name)
    if value % args.devices:
      parser.error(f"--{name}={value} is not divisible by --devices={args.devices}")
  if args.devices < 1 or args.batch < 1 or args.dim < 1 or args.block_size < 1:
    parser.error("--devices, --batch, --dim and --block_size must be positive")
  return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before jax is imported
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
  ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mmret.losses import contrastive, gcl, vsepp  # noqa: E402
from mmret.recipes.solar import losses as solar_losses  # noqa: E402

AXIS = "batch"
MODALITIES = ("z_image", "z_text", "z_joint")


def _outputs_loss(fn, **hparams):
  """(embeddings and logit_scale, extra) -> the loss ``fn`` of those model outputs."""

  def loss(params, extra, **kw):
    del extra
    return fn(dict(params), {}, **hparams, **kw)[0]

  return loss


def _stage2(params, extra, **kw):
  return solar_losses.stage2_contrastive_loss(
      params["z_image"],
      params["z_text"],
      params["z_joint"],
      extra["has_positive"],
      extra["has_negative"],
      temperature=0.05,
      **kw,
  )


# name -> (loss of (params, extra), embeddings it reads, whether it has a learnable logit_scale)
LOSSES = {
    "clip": (_outputs_loss(contrastive.clip_loss), MODALITIES[:2], True),
    "gcl": (_outputs_loss(gcl.gcl_loss), MODALITIES, True),
    "gcl_drop": (_outputs_loss(gcl.gcl_loss, drop_other_positive=True), MODALITIES, True),
    "pairwise": (_outputs_loss(gcl.pairwise_loss), MODALITIES, True),
    "vsepp": (_outputs_loss(vsepp.vsepp_loss), MODALITIES[:2], False),
    "vsepp_sum": (_outputs_loss(vsepp.vsepp_loss, max_violation=False), MODALITIES[:2], False),
    "solar_stage2": (_stage2, MODALITIES, False),  # views: original, positive, hard negative
}


def devices(n):
  """``n`` devices of the default backend, else of the host CPU."""
  for found in (jax.devices(), jax.devices("cpu")):
    if len(found) >= n:
      return found[:n]
  raise SystemExit(f"--devices={n}: only {len(jax.devices('cpu'))} CPU devices")


def value_and_grad_program(name, mesh, impl, block_size):
  """jit(shard_map(value and gradient of loss ``name``)) over ``mesh``."""
  loss_fn, keys, scaled = LOSSES[name]

  def per_device(params, extra):
    def objective(params):
      return loss_fn(params, extra, axis_name=AXIS, impl=impl, block_size=block_size)

    value, grads = jax.value_and_grad(objective)(params)
    if scaled:  # replicated: the mean of the devices' gradients
      grads["logit_scale"] = jax.lax.pmean(grads["logit_scale"], AXIS)
    return jax.lax.pmean(value, AXIS), grads

  rows = {k: P(AXIS) for k in keys}
  param_specs = dict(rows, **({"logit_scale": P()} if scaled else {}))
  extra_specs = {"has_positive": P(AXIS), "has_negative": P(AXIS)}
  mapped = jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(param_specs, extra_specs),
      out_specs=(P(), param_specs),
      check_vma=False,
  )
  return jax.jit(mapped), keys, scaled


def abstract_inputs(keys, scaled, mesh, batch, dim):
  rows = NamedSharding(mesh, P(AXIS))
  params = {k: jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows) for k in keys}
  if scaled:
    params["logit_scale"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  extra = {
      k: jax.ShapeDtypeStruct((batch,), bool, sharding=rows)
      for k in ("has_positive", "has_negative")
  }
  return params, extra


def concrete_inputs(keys, scaled, mesh, batch, dim, seed=0):
  rng = np.random.default_rng(seed)
  rows = NamedSharding(mesh, P(AXIS))

  def unit(shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  # Positives correlated with their anchors (cosine about 0.2), so hinges and softmaxes are active.
  base = unit((batch, dim))
  params = {k: unit((batch, dim)) + 0.5 * base for k in keys}
  params = {
      k: jax.device_put(v / np.linalg.norm(v, axis=-1, keepdims=True), rows)
      for k, v in params.items()
  }
  if scaled:
    params["logit_scale"] = jax.device_put(np.float32(np.log(1 / 0.07)), NamedSharding(mesh, P()))
  extra = {
      "has_positive": jax.device_put(rng.uniform(size=batch) < 0.9, rows),
      "has_negative": jax.device_put(rng.uniform(size=batch) < 0.8, rows),
  }
  return params, extra


def compiled_bytes(program, inputs):
  """Temporary + argument bytes per device of the compiled program."""
  analysis = program.lower(*inputs).compile().memory_analysis()
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes)


def timed(program, inputs, repeats):
  """(result, median milliseconds) of ``repeats`` runs after a warm-up (one run in flight)."""
  result = jax.block_until_ready(program(*inputs))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = jax.block_until_ready(program(*inputs))
    times.append(1e3 * (time.perf_counter() - t0))
  return result, float(np.median(times))


def measure(name, args, mesh):
  dense, keys, scaled = value_and_grad_program(name, mesh, "dense", args.block_size)
  flat, _, _ = value_and_grad_program(name, mesh, args.impl, args.block_size)
  shapes = abstract_inputs(keys, scaled, mesh, args.batch, args.dim)
  row = {
      "loss": name,
      "global_batch": args.batch,
      "dense_bytes": compiled_bytes(dense, shapes),
      "chunked_bytes": compiled_bytes(flat, shapes),
      "max_abs_diff": None,
      "dense_ms": None,
      "chunked_ms": None,
      "impl": args.impl,
      "block_size": args.block_size,
      "time_batch": args.time_batch or None,
  }
  if args.time_batch:
    inputs = concrete_inputs(keys, scaled, mesh, args.time_batch, args.dim)
    dense_out, row["dense_ms"] = timed(dense, inputs, args.repeats)
    flat_out, row["chunked_ms"] = timed(flat, inputs, args.repeats)
    row["max_abs_diff"] = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(dense_out), jax.tree.leaves(flat_out))
    )
  return row


def main(args):
  unknown = sorted(set(args.losses.split(",")) - set(LOSSES))
  if unknown:
    raise SystemExit(f"--losses: unknown {unknown}; known: {sorted(LOSSES)}")
  mesh = jax.sharding.Mesh(np.array(devices(args.devices)), (AXIS,))
  if not args.json:
    print(
        f"{args.devices} devices ({mesh.devices.flat[0].platform}), dim {args.dim}, "
        f"impl {args.impl}, block {args.block_size}; bytes per device at batch {args.batch}, "
        f"diff and ms at batch {args.time_batch}"
    )
  for name in args.losses.split(","):
    row = measure(name, args, mesh)
    if args.json:
      print(json.dumps(row), flush=True)
    else:
      ratio = row["dense_bytes"] / max(row["chunked_bytes"], 1)
      timing = ""
      if row["dense_ms"] is not None:
        timing = (
            f"  diff {row['max_abs_diff']:.1e}  {row['dense_ms']:.1f} ms -> "
            f"{row['chunked_ms']:.1f} ms ({row['chunked_ms'] / row['dense_ms']:.2f}x)"
        )
      print(
          f"{name:13s} {row['dense_bytes'] / 2**20:10.1f} MiB -> "
          f"{row['chunked_bytes'] / 2**20:8.1f} MiB ({ratio:5.1f}x less){timing}",
          flush=True,
      )


if __name__ == "__main__":
  sys.exit(main(ARGS))
