r"""The GCL paper-table analog: a pretrained dual encoder before and after CL / pairwise / GCL.

  python -m experiments.gcl_table --workdir=DIR [--seeds=0,1,2] [--size=tiny] \
      [--world=tiny] [--steps=100] [--pretrain_steps=200] [--fusion=fusion]

For each seed, ``init`` trains the CLIP pretraining stage of configs/gcl.py (the dual encoder
before fine-tuning); ``cl``, ``pairwise`` and ``gcl`` fine-tune that same checkpoint (their
``1_pretrain`` stage directory links to init's) with their loss. Every variant is evaluated on
the universal split (Recall@5 per task in its local pool, the local and global averages) and by
the modality gap. Writes ``DIR/gcl_table.md`` (mean ± std over seeds) and ``DIR/gcl_table.json``
(per-seed metrics, their mean and std, the arguments, this invocation's wall time). Runs live in
``DIR/<variant>/seed<k>``; finished ones are reused when the command is run again. The defaults
(3 seeds, 200 + 100 steps, tiny) take about 10 CPU-minutes.
"""

import functools
import json
import os
import re
import time

import numpy as np
from absl import app, flags, logging

from configs import gcl
from experiments import table
from mmret import config_lib, runtime, train
from mmret.data import world

VARIANTS = ("init", "cl", "pairwise", "gcl", "gcl_drop")
DEFAULT_VARIANTS = ("init", "cl", "pairwise", "gcl")
# Fine-tuning loss of each variant; gcl_drop is GCL with drop_other_positive.
LOSS_OF = {"init": "gcl", "cl": "cl", "pairwise": "pairwise", "gcl": "gcl", "gcl_drop": "gcl"}
# Modality-gap columns: evaluation name -> pairs of modalities.
GAP_EVALS = ("gap_universal", "gap_train")
GAP_PAIRS = ("i-t", "i-it", "t-it")
_LOCAL_RECALL = re.compile(r"^eval/universal/local/(?P<task>[^/]+)/recall@5$")


def config_arg(
    variant: str,
    *,
    size: str,
    world_name: str,
    steps: int,
    pretrain_steps: int,
    fusion: str,
    lr: float,
    temperature: float,
    drop_other_positive: bool,
    towers: str = "scratch",
) -> str:
  """The configs/gcl.py argument string of ``variant`` (init uses gcl's, only its first stage)."""
  loss = LOSS_OF[variant]
  arg = (
      f"size={size},world={world_name},loss={loss},fusion={fusion},steps={steps},"
      f"pretrain_steps={pretrain_steps},lr={lr},temperature={temperature},towers={towers}"
  )
  if loss == "gcl" and (drop_other_positive or variant == "gcl_drop"):
    arg += ",drop_other_positive=true"
  return arg


def make_variant_config(variant: str, seed: int, data_dir=None, overrides=None, **arg_fields):
  """The config of one run: configs/gcl.py with ``variant``'s loss; init keeps only pretraining.

  ``overrides`` maps dotted config paths to values (e.g. ``{'input.batch_size': 16}``).
  """
  config = gcl.get_config(config_arg(variant, **arg_fields))
  config.seed = seed
  if data_dir:
    config.input.data_dir = data_dir
  config.update_from_flattened_dict(dict(overrides or {}))
  if variant == "init":
    config.stages = {gcl.PRETRAIN: config.stages[gcl.PRETRAIN].to_dict()}
  return config


def link_pretrain_stages(workdir: str, variants, seeds):
  """Points each fine-tuned run's pretraining stage at init's, so it is trained once per seed.

  The training loop skips a finished non-final stage and starts the next one from its
  checkpoint; the links may dangle until init's run of that seed has finished.
  """
  for variant in variants:
    if variant == "init":
      continue
    for seed in seeds:
      run_dir = os.path.join(workdir, variant, f"seed{seed}")
      os.makedirs(run_dir, exist_ok=True)
      link = train.stage_dir(run_dir, gcl.PRETRAIN)
      target = os.path.relpath(
          train.stage_dir(os.path.join(workdir, "init", f"seed{seed}"), gcl.PRETRAIN), run_dir
      )
      if os.path.islink(link) and os.readlink(link) == target:
        continue
      if os.path.lexists(link):
        raise FileExistsError(
            f"{link} exists and is not a link to {target}; remove it or use " "another workdir"
        )
      os.symlink(target, link)


def task_order(results) -> list[str]:
  """Tasks with a local Recall@5 in every run, in the world's task order (others after)."""
  found = None
  for runs in results.values():
    for run in runs:
      tasks = {m["task"] for m in map(_LOCAL_RECALL.match, run) if m}
      found = tasks if found is None else found & tasks
  known = [t for t in world.UNIVERSAL_TASKS if t in (found or ())]
  return known + sorted((found or set()) - set(known))


def retrieval_columns(tasks) -> dict[str, str]:
  columns = {task: f"eval/universal/local/{task}/recall@5" for task in tasks}
  columns["local avg"] = "eval/universal/local/average"
  columns["global avg"] = "eval/universal/global/average"
  return columns


def gap_columns() -> dict[str, str]:
  return {
      f"{name.removeprefix('gap_')} cos {pair}": f"eval/{name}/cosine/{pair}"
      for name in GAP_EVALS
      for pair in GAP_PAIRS
  }


def summarise(results, columns) -> dict:
  """{variant: {metric key: {'mean', 'std'}}} (std over seeds, ddof=1; 0 for one seed)."""
  out = {}
  for variant, runs in results.items():
    out[variant] = {}
    for key in columns.values():
      values = np.asarray([run[key] for run in runs], np.float64)
      std = values.std(ddof=1) if len(values) > 1 else 0.0
      out[variant][key] = {"mean": float(values.mean()), "std": float(std)}
  return out


def model_name(args: dict) -> str:
  """The model size the runs used (towers=shipped fixes it)."""
  return config_lib.SHIPPED_SIZE if args.get("towers") == "shipped" else args["size"]


def paired_differences(results) -> list[str]:
  """Per-seed differences of each fine-tuned variant against ``cl`` (same seed, same init):
  mean ± std over seeds of the local and global averages, as Markdown lines."""
  if "cl" not in results:
    return []
  lines = [
      "Paired with CL (same seed and pretrained start), mean ± std over seeds of the difference:",
      "",
  ]
  for variant in results:
    if variant in ("init", "cl"):
      continue
    cells = []
    for name, key in (
        ("local avg", "eval/universal/local/average"),
        ("global avg", "eval/universal/global/average"),
    ):
      diff = np.asarray([a[key] - b[key] for a, b in zip(results[variant], results["cl"])])
      std = diff.std(ddof=1) if len(diff) > 1 else 0.0
      cells.append(f"{name} {diff.mean():+.2f} ± {std:.2f}")
    lines.append(f"- {variant} − cl: " + ", ".join(cells))
  return lines


def write_tables(workdir: str, results, *, args: dict, seeds, wall_s: float) -> str:
  """Writes gcl_table.md and gcl_table.json; returns the Markdown."""
  tasks = task_order(results)
  retrieval, gap = retrieval_columns(tasks), gap_columns()
  markdown = "\n".join(
      [
          f"GCL analog ({model_name(args)} model, {args.get('towers', 'scratch')} towers, "
          f"mmret_world/{args['world']}, fusion={args['fusion']}, "
          f"{args['pretrain_steps']} pretraining + {args['steps']} fine-tuning steps, "
          f"seeds {','.join(map(str, seeds))}; mean ± std over seeds).",
          "",
          "Universal split, Recall@5 per task in its local pool, and the local / global averages:",
          "",
          table.markdown_table(results, retrieval),
          "Modality gap: cosine similarity between the centroids of the image (i), text (t) and "
          "image+text (it) embeddings, on the universal candidates and the train pairs "
          "(init = before fine-tuning):",
          "",
          table.markdown_table(results, gap),
          "",
          *paired_differences(results),
      ]
  )
  with open(os.path.join(workdir, "gcl_table.md"), "w") as f:
    f.write(markdown)
  record = {
      "args": args,
      "seeds": list(seeds),
      "invocation_wall_s": wall_s,
      "summary": summarise(results, {**retrieval, **gap}),
      "runs": {variant: [dict(run) for run in runs] for variant, runs in results.items()},
  }
  with open(os.path.join(workdir, "gcl_table.json"), "w") as f:
    json.dump(record, f, indent=1)
  return markdown


def check_workdir_args(workdir: str, args: dict):
  """Records the table's arguments in ``workdir``; refuses a workdir holding other arguments' runs.

  Finished runs are reused by variant and seed alone, so mixing arguments would mix tables.
  """
  path = os.path.join(workdir, "table_args.json")
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != args:
      changed = sorted(k for k in set(previous) | set(args) if previous.get(k) != args.get(k))
      raise ValueError(
          f"{workdir} holds runs made with other arguments (changed: {changed}; "
          f"recorded in {path}); use another workdir"
      )
    return
  with open(path, "w") as f:
    json.dump(args, f, indent=1, sort_keys=True)


def run_table(
    workdir: str, seeds, *, variants=DEFAULT_VARIANTS, data_dir=None, overrides=None, **arg_fields
) -> str:
  """Trains and evaluates ``variants`` for every seed; writes and returns the Markdown table.

  ``arg_fields`` are :func:`config_arg`'s keywords and ``overrides`` further config changes
  (see :func:`make_variant_config`); ``init`` must come first in ``variants``
  when any fine-tuned variant is listed (they start from its checkpoints).
  """
  if any(v != "init" for v in variants) and (not variants or variants[0] != "init"):
    raise ValueError(f"variants must start with 'init' (fine-tuning starts from it): {variants}")
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown variants {unknown}; known: {VARIANTS}")
  start = time.time()
  seeds = [int(s) for s in seeds]
  os.makedirs(workdir, exist_ok=True)
  args = dict(arg_fields, world=arg_fields["world_name"])
  args.pop("world_name")
  if overrides:
    args["overrides"] = dict(overrides)
  # Seeds and variants may grow between invocations; the training arguments may not.
  check_workdir_args(workdir, args)
  link_pretrain_stages(workdir, variants, seeds)
  make_configs = {
      variant: (
          lambda seed, v=variant: make_variant_config(v, seed, data_dir, overrides, **arg_fields)
      )
      for variant in variants
  }
  results = table.run_variants(make_configs, seeds, workdir)
  return write_tables(workdir, results, args=args, seeds=seeds, wall_s=time.time() - start)


def define_flags() -> dict:
  """The command-line flags, defined only when this module is the program (other table modules
  define flags of the same names, and absl refuses a name defined twice in one process)."""
  return dict(
      workdir=flags.DEFINE_string("workdir", None, "Directory of the runs and the table."),
      seeds=flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (each variant runs once per seed)."),
      size=flags.DEFINE_string("size", "tiny", "Model size."),
      world_name=flags.DEFINE_string("world", "tiny", "Embedded world."),
      steps=flags.DEFINE_integer("steps", 100, "Fine-tuning steps of cl / pairwise / gcl."),
      pretrain_steps=flags.DEFINE_integer("pretrain_steps", 200, "CLIP pretraining steps (init)."),
      fusion=flags.DEFINE_enum("fusion", "fusion", list(gcl.FUSIONS), "Image+text embedding."),
      lr=flags.DEFINE_float("lr", 3e-4, "Fine-tuning peak learning rate."),
      temperature=flags.DEFINE_float(
          "temperature", 0.0, "Fixed fine-tuning temperature (0: learnable)."
      ),
      drop_other_positive=flags.DEFINE_bool(
          "drop_other_positive", False, "GCL without the anchor's third modality in denominators."
      ),
      data_dir=flags.DEFINE_string("data_dir", None, "Dataset directory (default: the config's)."),
      towers=flags.DEFINE_enum(
          "towers",
          "scratch",
          ["scratch", "shipped"],
          "'shipped': frozen EfficientNet-Lite0 + MiniLM towers (configs/gcl.py's towers=shipped)",
      ),
      variants=flags.DEFINE_list(
          "variants", list(DEFAULT_VARIANTS), f"Rows, starting with init; known: {VARIANTS}."
      ),
  )


def main(argv, flag_holders: dict):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  values = {name: holder.value for name, holder in flag_holders.items()}
  workdir, seeds = values.pop("workdir"), values.pop("seeds")
  if not workdir:
    raise app.UsageError("--workdir is required")
  runtime.enable_compilation_cache(os.path.join(workdir, "jax_cache"), min_compile_secs=0.0)
  start = time.time()
  markdown = run_table(workdir, seeds, **values)
  logging.info("GCL table written to %s in %.0f s", workdir, time.time() - start)
  print(markdown)


if __name__ == "__main__":
  app.run(functools.partial(main, flag_holders=define_flags()))
