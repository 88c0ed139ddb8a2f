"""SOLAR's diagnosis ladder: stage 1 trained under one change at a time, its masks measured.

  python -m experiments.solar_ladder --workdir=/tmp/solar_ladder

Each rung trains SOLAR's stage 1 (``configs/solar.py``, seed 0, batch 32) with the rung's
arguments and overrides, then fits masks on the held-out pairs of the world (split ``val``, 256
pairs no run trained on) with the threshold estimators ('pairs', the paper's, and 'mixture') on
the paper's cosine scores and 'pairs' on the contrast scores (``masks.token_score_samples``), and
scores them against the ground truth: AUC of the token/patch scores (intersection vs all other
units, and vs the difference units alone; 50 = chance, independent of the threshold), precision,
recall and predicted fraction of the masks. Base rates: 34 % of caption tokens, 12 % of patches are intersection. Writes
``<workdir>/solar_ladder.md`` and ``solar_ladder.json``; finished rungs are reused.
"""

import json
import os

import ml_collections
from absl import app, flags

from configs import solar as solar_config
from mmret import runtime, train
from mmret.data import sources
from mmret.recipes.solar import evaluator

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where the rungs' runs and the table go.", required=True)
flags.DEFINE_multi_string(
    "rungs",
    [],
    "Only this rung (repeat the flag for several; default: all but the shipped-tower one).",
)
flags.DEFINE_integer("seed", 0, "Training seed of every rung.")

NEVER = 10**9  # an anneal start no run reaches: rho stays 1
# name -> (configs/solar.py arguments, {dotted stage-1 config field: value}).
RUNGS = {
    "tower depth 2, 150 steps (the size's towers)": ("tower_depth=-1,threshold=mixture", {}),
    "tower depth 2, 600 steps": ("tower_depth=-1,threshold=mixture,stage1_steps=600", {}),
    "tower depth 2, GLA weight 3, margin 0.5": (
        "tower_depth=-1,threshold=mixture",
        {"loss.gla_weight": 3.0, "loss.gla_margin": 0.5},
    ),
    "tower depth 2, LD and GD weight 1": (
        "tower_depth=-1,threshold=mixture",
        {"loss.ld_weight": 1.0, "loss.gd_weight": 1.0},
    ),
    "tower depth 2, lr 3e-3": ("tower_depth=-1,threshold=mixture", {"optim.lr": 3e-3}),
    "tower depth 1, 150 steps": ("tower_depth=1,threshold=mixture", {}),
    "tower depth 0, 150 steps": ("tower_depth=0,threshold=mixture", {}),
    "tower depth 0, 600 steps": ("tower_depth=0,threshold=mixture,stage1_steps=600", {}),
    "tower depth 0, 600 steps, GLA weight 5": (
        "tower_depth=0,threshold=mixture,stage1_steps=600",
        {"loss.gla_weight": 5.0},
    ),
    "tower depth 0, 600 steps, no LD/GD": (
        "tower_depth=0,threshold=mixture,stage1_steps=600",
        {"loss.ld_weight": 0.0, "loss.gd_weight": 0.0},
    ),
    "tower depth 0, 600 steps, GD with its diagonal": (
        "tower_depth=0,threshold=mixture,stage1_steps=600",
        {"loss.gd_include_self": True},
    ),
    "tower depth 0, 600 steps, small world (10k pairs)": (
        "tower_depth=0,threshold=mixture,stage1_steps=600,world=small",
        {},
    ),
    # Pretrained towers (frozen EfficientNet-Lite0 + MiniLM, real-image world; the towers'
    # outputs come from the feature cache); run it with --rungs.
    "shipped towers, 150 steps": ("towers=shipped,world=fashion_tiny,threshold=mixture", {}),
    # GLA's gradient is 100-300x smaller than the masked ITC's at the start (README, rung 3), and
    # masks from untrained scores keep the masked ITC near chance with depth-0 towers: the
    # masked ITC sees every unit (rho 1) throughout, or until step 75.
    "tower depth 0, rho 1 throughout": (
        "tower_depth=0",
        {"method.anneal_start": NEVER},
    ),
    "tower depth 0, rho 1 throughout, GLA weight 30": (
        "tower_depth=0,gla_weight=30",
        {"method.anneal_start": NEVER},
    ),
    "tower depth 2, rho 1 throughout, GLA weight 30": (
        "tower_depth=-1,gla_weight=30",
        {"method.anneal_start": NEVER},
    ),
    "tower depth 0, masks from step 75, GLA weight 30, contrast score": (
        "tower_depth=0,gla_weight=30,anneal_start=75,score=contrast",
        {},
    ),
    # GLA contrasting every token and patch on its own (gla=token) instead of the caption's mean
    # cosine: the per-token objective README's rung 9 points to.
    "tower depth 0, rho 1 throughout, per-token GLA": (
        "tower_depth=0,gla=token",
        {"method.anneal_start": NEVER},
    ),
    "tower depth 2, rho 1 throughout, per-token GLA": (
        "tower_depth=-1,gla=token",
        {"method.anneal_start": NEVER},
    ),
    "tower depth 2, per-token GLA, contrast score": ("tower_depth=-1,gla=token,score=contrast", {}),
}
DEFAULT_SKIP = ("shipped towers, 150 steps",)
# Mask fits each rung is measured with: (threshold estimator, token score).
ESTIMATORS = (("pairs", "cosine"), ("mixture", "cosine"), ("pairs", "contrast"))
COLUMNS = (
    ("text AUC (vs diff.)", ("text_mask/auc", "text_mask/auc_vs_difference")),
    (
        "text P / R / pred",
        ("text_mask/precision", "text_mask/recall", "text_mask/predicted_fraction"),
    ),
    ("patch AUC (vs diff.)", ("patch_mask/auc", "patch_mask/auc_vs_difference")),
    (
        "patch P / R / pred",
        ("patch_mask/precision", "patch_mask/recall", "patch_mask/predicted_fraction"),
    ),
)


def stage1_config(args: str, overrides: dict, seed: int) -> ml_collections.ConfigDict:
  config = dict(train.stage_configs(solar_config.get_config(args)))["stage1"]
  with config.unlocked():
    for dotted, value in overrides.items():
      *path, last = dotted.split(".")
      node = config
      for part in path:
        node = node[part]
      if last not in node:
        raise KeyError(f"rung override {dotted!r}: no field {last!r} in {sorted(node)}")
      node[last] = value
    config.seed = seed
    config.evals = ml_collections.ConfigDict()
  return config


def run_rung(name: str, args: str, overrides: dict, workdir: str, seed: int) -> dict:
  done = os.path.join(workdir, "masks.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  config = stage1_config(args, overrides, seed)
  train.train_stage(config, workdir, run_final_evals=False)
  setup = train.Setup(config)
  params = train.load_params(config, workdir)
  data = sources.open_split(solar_config.get_config(args).stages.stage1.evals.masks.dataset, "val")
  out = {"rung": name, "args": args, "overrides": overrides}
  for threshold, score in ESTIMATORS:
    out[f"{threshold}, {score}"] = evaluator.evaluate_solar_masks(
        setup.predict,
        data=data,
        input_cfg=config.input,
        params=params,
        workdir=os.path.join(workdir, f"masks_{threshold}_{score}"),
        threshold=threshold,
        score=score,
    )
  with open(done, "w") as f:
    json.dump(out, f, indent=2)
  return out


def markdown(results) -> str:
  headers = ["rung", "estimator, score"] + [c for c, _ in COLUMNS]
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for result in results:
    for threshold, score in ESTIMATORS:
      estimator = f"{threshold}, {score}"
      metrics = result[estimator]
      cells = []
      for _, keys in COLUMNS:
        keys = (keys,) if isinstance(keys, str) else keys
        cells.append(" / ".join(f"{metrics[k]:.1f}" for k in keys))
      lines.append(f"| {result['rung']} | {estimator} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.rungs) - set(RUNGS))
  if unknown:
    raise app.UsageError(f"unknown --rungs {unknown}; rungs: {list(RUNGS)}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  runtime.enable_compilation_cache(os.path.join(FLAGS.workdir, "xla_cache"))
  results = []
  for index, (name, (args, overrides)) in enumerate(RUNGS.items()):
    if (FLAGS.rungs and name not in FLAGS.rungs) or (not FLAGS.rungs and name in DEFAULT_SKIP):
      continue
    run_dir = os.path.join(FLAGS.workdir, f"rung{index:02d}")
    results.append(run_rung(name, args, overrides, run_dir, FLAGS.seed))
  text = (
      f"SOLAR stage-1 masks on the held-out pairs (mmret_world val split, seed {FLAGS.seed}; "
      "P / R / pred: precision, recall, predicted fraction, percent)\n\n" + markdown(results)
  )
  with open(os.path.join(FLAGS.workdir, "solar_ladder.md"), "w") as f:
    f.write(text)
  with open(os.path.join(FLAGS.workdir, "solar_ladder.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(text)


if __name__ == "__main__":
  app.run(main)
