"""SOLAR's paper-table analog on the embedded world: MM2MM for five recipes, mean ± std over seeds.

  python -m experiments.solar_table --workdir=/tmp/solar_table
  python -m experiments.solar_table --workdir=/tmp/solar_val --split=mm2mm_val \
      --solar_args=threshold=mixture,negatives=fact   # choose settings on the held-out set

Rows: CL with score fusion (image<->text InfoNCE, z_joint = normalise(z_image + z_text)), GCL on
the same score-fusion model, SOLAR stage 1 only (the full-SOLAR runs' stage-1 result, evaluated
before stage 2), full SOLAR, SOLAR with random masks of the learned masks' density, and (a
diagnostic) SOLAR whose stage 2 builds its views from the ground-truth intersection labels. Baselines
train for as many steps as SOLAR's two stages together, at the same batch size. Columns:
Recall@1/5/10, mR, Precision overall and by the kind of fact the hard negative changes, Avg. Writes
``<workdir>/solar_table.md`` and ``solar_table.json`` (every run's metrics); finished runs are
reused when the command is repeated. XLA compilations are cached in ``<workdir>/xla_cache`` so
that seeds after the first skip them.

``--split`` picks the MM2MM set: 'mm2mm' (reported) or 'mm2mm_val' (held out, for choosing
settings). ``--solar_args`` are extra ``configs/solar.py`` arguments for every SOLAR row (e.g.
``threshold=mixture,negatives=fact``). ``--towers=shipped`` starts every row from the real
EfficientNet-Lite0 / MiniLM towers (frozen), on a real-image world (``--world=fashion_tiny``).
Besides the table: the per-seed difference SOLAR - CL (mean ± std over seeds) and the stage-1 mask
quality of the learned-mask runs (``solar_masks`` on the training split).
"""

import json
import os

from absl import app, flags

from configs import clip as clip_config
from configs import solar as solar_config
from experiments import table
from mmret import config_lib, runtime, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where runs, the table and its json go.", required=True)
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds (at least 3).")
flags.DEFINE_string("data_dir", None, "Dataset directory (default: the input config's).")
flags.DEFINE_string("world", "tiny", "Embedded world size.")
flags.DEFINE_integer("stage1_steps", 150, "SOLAR stage-1 steps.")
flags.DEFINE_integer("stage2_steps", 50, "SOLAR stage-2 steps (baselines train for the sum).")
flags.DEFINE_integer("batch_size", 32, "Global batch size of every recipe.")
flags.DEFINE_enum("split", "mm2mm", ["mm2mm", "mm2mm_val"], "MM2MM set to evaluate on.")
flags.DEFINE_string("solar_args", "", "Extra configs/solar.py arguments for the SOLAR rows.")
flags.DEFINE_enum("towers", "scratch", list(config_lib.TOWERS), "Towers of every row.")
flags.DEFINE_multi_string(
    "rows", [], "Only this row; repeat the flag for several (row names hold commas). Default: all."
)

METRIC = "eval/mm2mm/{}"
COLUMNS = {
    "R@1": METRIC.format("recall@1"),
    "R@5": METRIC.format("recall@5"),
    "R@10": METRIC.format("recall@10"),
    "mR": METRIC.format("mR"),
    "Precision": METRIC.format("precision"),
    "P intersection": METRIC.format("precision/intersection"),
    "P image-only": METRIC.format("precision/image_only"),
    "P text-only": METRIC.format("precision/text_only"),
    "Avg": METRIC.format("avg"),
}
MASK_METRIC = "eval/masks/{}"
MASK_COLUMNS = {
    "text precision": MASK_METRIC.format("text_mask/precision"),
    "text recall": MASK_METRIC.format("text_mask/recall"),
    "text base rate": MASK_METRIC.format("text_mask/true_fraction"),
    "text AUC": MASK_METRIC.format("text_mask/auc"),
    "patch precision": MASK_METRIC.format("patch_mask/precision"),
    "patch recall": MASK_METRIC.format("patch_mask/recall"),
    "patch base rate": MASK_METRIC.format("patch_mask/true_fraction"),
    "patch AUC": MASK_METRIC.format("patch_mask/auc"),
}
CL_ROW = "CL (score fusion)"
STAGE1_ROW, SOLAR_ROW = "SOLAR stage 1 only", "SOLAR"
# Diagnostic row: stage 2 from the ground-truth intersection labels (what perfect masks give).
ORACLE_ROW = "SOLAR, ground-truth masks in stage 2"


def _common(config, seed, data_dir, batch_size):
  config.seed = seed
  config.input.batch_size = batch_size
  if data_dir:
    config.input.data_dir = data_dir
  return config


def _mm2mm(world, split):
  return dict(type="mm2mm", dataset=f"mmret_world/{world}", split=split, batch_size=64, every=0)


def baseline(loss_name, *, world, steps, batch_size, data_dir, split, towers):
  """CLIP towers with score fusion trained with ``loss_name`` ('cl' or 'gcl')."""

  def make(seed):
    size = f"size={config_lib.SHIPPED_SIZE}," if towers == "shipped" else ""
    config = clip_config.get_config(f"{size}world={world},steps={steps},evals=false")
    if towers == "shipped":
      config_lib.use_shipped_towers(config)
    config.loss.name = loss_name
    config.model.joint_kind = "fusion"
    config.evals.mm2mm = _mm2mm(world, split)
    config.log_every = 50
    config.ckpt_every = steps
    return _common(config, seed, data_dir, batch_size)

  return make


def solar(
    *,
    world,
    stage1_steps,
    stage2_steps,
    batch_size,
    data_dir,
    split,
    towers,
    solar_args="",
    random_masks=False,
    oracle_masks=False,
):
  """The two-stage recipe; the learned-mask variant also evaluates MM2MM and the masks' quality
  after stage 1."""

  def make(seed):
    extra = f",{solar_args}" if solar_args else ""
    config = solar_config.get_config(
        f"world={world},stage1_steps={stage1_steps},stage2_steps={stage2_steps},"
        f"random_masks={random_masks},oracle_masks={oracle_masks},towers={towers},"
        f"eval_split={split}{extra}"
    )
    masks_eval = config.stages.stage1.evals.masks
    config.stages.stage2.evals = {"mm2mm": _mm2mm(world, split)}
    config.stages.stage1.evals = {}
    if not (random_masks or oracle_masks):
      config.stages.stage1.evals = {"mm2mm": _mm2mm(world, split), "masks": masks_eval}
    config.ckpt_every = max(stage1_steps, stage2_steps)
    return _common(config, seed, data_dir, batch_size)

  return make


def variants(
    *,
    world,
    stage1_steps,
    stage2_steps,
    batch_size,
    data_dir=None,
    split="mm2mm",
    towers="scratch",
    solar_args="",
) -> dict:
  total = stage1_steps + stage2_steps
  shared = dict(world=world, batch_size=batch_size, data_dir=data_dir, split=split, towers=towers)
  steps = dict(stage1_steps=stage1_steps, stage2_steps=stage2_steps, solar_args=solar_args)
  return {
      CL_ROW: baseline("cl", steps=total, **shared),
      "GCL (score fusion)": baseline("gcl", steps=total, **shared),
      SOLAR_ROW: solar(**steps, **shared),
      "SOLAR, random masks": solar(random_masks=True, **steps, **shared),
      ORACLE_ROW: solar(oracle_masks=True, **steps, **shared),
  }


def difference(runs, row, baseline_row, key) -> str:
  """Per-seed ``row`` - ``baseline_row`` of metric ``key``, as mean ± std over the seeds."""
  return table.mean_std([a[key] - b[key] for a, b in zip(runs[row], runs[baseline_row])])


def stage1_results(workdir, seeds) -> list:
  """Final metrics of the full-SOLAR runs' first stage (evaluated on MM2MM before stage 2)."""
  out = []
  for seed in seeds:
    path = os.path.join(
        train.stage_dir(os.path.join(workdir, SOLAR_ROW, f"seed{seed}"), "stage1"),
        "final_metrics.json",
    )
    with open(path) as f:
      out.append(json.load(f))
  return out


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds]
  if len(seeds) < 3:
    raise app.UsageError(f"--seeds needs at least 3 seeds for mean ± std, got {seeds}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  runtime.enable_compilation_cache(os.path.join(FLAGS.workdir, "xla_cache"))
  rows = variants(
      world=FLAGS.world,
      stage1_steps=FLAGS.stage1_steps,
      stage2_steps=FLAGS.stage2_steps,
      batch_size=FLAGS.batch_size,
      data_dir=FLAGS.data_dir,
      split=FLAGS.split,
      towers=FLAGS.towers,
      solar_args=FLAGS.solar_args,
  )
  unknown = sorted(set(FLAGS.rows) - set(rows))
  if unknown:
    raise app.UsageError(f"unknown --rows {unknown}; rows: {list(rows)}")
  if FLAGS.rows:
    rows = {name: make for name, make in rows.items() if name in FLAGS.rows}
  runs = table.run_variants(rows, seeds, FLAGS.workdir)
  ordered = {}
  for name, results in runs.items():
    if name == SOLAR_ROW:
      ordered[STAGE1_ROW] = stage1_results(FLAGS.workdir, seeds)
    ordered[name] = results
  markdown = table.markdown_table(ordered, COLUMNS)
  if SOLAR_ROW in runs and CL_ROW in runs:
    avg = COLUMNS["Avg"]
    markdown += f"\nPer-seed SOLAR - CL, Avg: {difference(runs, SOLAR_ROW, CL_ROW, avg)}\n"
  if SOLAR_ROW in ordered:
    markdown += "\nStage-1 masks of the SOLAR runs (held-out pairs, split val; percent):\n\n"
    markdown += table.markdown_table({SOLAR_ROW: ordered[STAGE1_ROW]}, MASK_COLUMNS)
  extra = f"; SOLAR arguments {FLAGS.solar_args}" if FLAGS.solar_args else ""
  header = (
      f"MM2MM ({FLAGS.split}) on mmret_world/{FLAGS.world}, {FLAGS.towers} towers "
      f"({len(seeds)} seeds, mean ± std; batch {FLAGS.batch_size}; SOLAR {FLAGS.stage1_steps} + "
      f"{FLAGS.stage2_steps} steps, baselines {FLAGS.stage1_steps + FLAGS.stage2_steps} "
      f"steps{extra})\n\n"
  )
  with open(os.path.join(FLAGS.workdir, "solar_table.md"), "w") as f:
    f.write(header + markdown)
  with open(os.path.join(FLAGS.workdir, "solar_table.json"), "w") as f:
    json.dump({"seeds": seeds, "columns": COLUMNS, "runs": ordered}, f, indent=2)
  print(header + markdown)


if __name__ == "__main__":
  app.run(main)
