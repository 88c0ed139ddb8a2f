r"""SelfAlign's ablation table on the embedded world: base / +concept / +context / both.

  python -m experiments.selfalign_table --workdir=/tmp/selfalign_table [--seeds=0,1,2] \
      [--steps=150] [--sum_warmup=100] [--size=tiny] [--world=tiny] [--data_dir=/tmp/mmret_data]

Each variant of ``configs/selfalign.py`` is trained for every seed and evaluated with the 5-caption
protocol on the world's ``caption5`` split; cells are mean ± std (over seeds) of R@1/5/10 both ways
and R@sum, in percent; the last column re-scores every trained model by global.global alone (the
variants with the context loss are otherwise scored by SelfAlign's final similarity). Writes ``selfalign_table.md`` and ``selfalign_table.json`` (every run's
metrics) into the workdir; finished runs are reused when the command is run again.
"""

import copy
import json
import os
import time

from absl import app, flags

from configs import selfalign
from experiments import table
from mmret import registry, train
from mmret.evals import runner

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags, defined only when this module is the program (other modules define
  flags of the same names, and absl refuses a name defined twice in one process)."""
  flags.DEFINE_string("workdir", None, "Directory for the runs and the table.", required=True)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (at least 3 for the table).")
  flags.DEFINE_integer("steps", 150, "Training steps per run (both stages).")
  flags.DEFINE_integer("sum_warmup", 100, "Steps of the sum-over-negatives first stage.")
  flags.DEFINE_string("size", "tiny", "Model size.")
  flags.DEFINE_string("world", "tiny", "Embedded world size.")
  flags.DEFINE_string("data_dir", None, "Dataset directory (default: the input config's).")
  flags.DEFINE_enum(
      "towers", "scratch", ["scratch", "shipped"], "'shipped': frozen EfficientNet-Lite0 + MiniLM."
  )


VARIANT_NAMES = {
    "base": "base (VSE++)",
    "concept": "+concept",
    "context": "+context",
    "both": "both (SelfAlign)",
}
PREFIX = "eval/caption5/"
COLUMNS = {
    "i2t R@1": PREFIX + "i2t/recall@1",
    "i2t R@5": PREFIX + "i2t/recall@5",
    "i2t R@10": PREFIX + "i2t/recall@10",
    "t2i R@1": PREFIX + "t2i/recall@1",
    "t2i R@5": PREFIX + "t2i/recall@5",
    "t2i R@10": PREFIX + "t2i/recall@10",
    "R@sum": PREFIX + "rsum",
    "R@sum, global score": "global_scored/rsum",
}
GLOBAL_SCORED = "global_scored.json"


def variant_configs(
    *,
    steps: int,
    sum_warmup: int,
    size: str = "tiny",
    world: str = "tiny",
    data_dir=None,
    towers: str = "scratch",
) -> dict:
  """{variant: make_config(seed)} for the four variants (runs in ``workdir/<variant>/seed<k>``)."""

  def maker(variant):
    def make_config(seed):
      config = selfalign.get_config(
          f"size={size},world={world},variant={variant},steps={steps},"
          f"sum_warmup={sum_warmup},towers={towers}"
      )
      config.seed = seed
      if data_dir:
        config.input.data_dir = data_dir
      return config

    return make_config

  return {variant: maker(variant) for variant in VARIANT_NAMES}


def global_scored_metrics(config, run_dir: str) -> dict:
  """caption5 metrics of a finished run re-scored by global.global alone, as ``global_scored/...``.

  Separates what the training of a variant changes from what its final similarity changes. Cached
  in ``run_dir/global_scored.json``.
  """
  cache = os.path.join(run_dir, GLOBAL_SCORED)
  if os.path.exists(cache):
    with open(cache) as f:
      return json.load(f)
  stage, stage_dir = train.last_stage(config, run_dir)
  params = train.load_params(stage, stage_dir)
  scoring = copy.deepcopy(stage)
  scoring.method.similarity = "global"
  predict = train.Setup(scoring).predict  # Setup's predict normalises the uint8 pixels
  results = runner.run_evals(
      predict,
      {"caption5": stage.evals.caption5.to_dict()},
      stage.input,
      stage.total_steps,
      None,
      evaluators=registry.evaluator,
      params=params,
      final=True,
      data_dir=stage.input.data_dir,
  )
  metrics = {"global_scored/" + key[len(PREFIX) :]: value for key, value in results.items()}
  with open(cache, "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics


def write_table(results: dict, workdir: str, *, command: str, seconds: float, seeds) -> str:
  """Writes selfalign_table.md / .json from {variant: [metrics per seed]}; returns the markdown."""
  scoring = {
      VARIANT_NAMES[v]: selfalign.get_config(f"variant={v}").method.similarity for v in results
  }
  body = table.markdown_table({VARIANT_NAMES[v]: runs for v, runs in results.items()}, COLUMNS)
  markdown = (
      f"Caption5 retrieval on the embedded world, mean ± std over seeds {list(seeds)}; scoring: "
      + ", ".join(f"{name} = {score}" for name, score in scoring.items())
      + ".\n\n"
      + body
      + f"\n`{command}` ({seconds / 60:.1f} min)\n"
  )
  with open(os.path.join(workdir, "selfalign_table.md"), "w") as f:
    f.write(markdown)
  with open(os.path.join(workdir, "selfalign_table.json"), "w") as f:
    json.dump(
        {
            "command": command,
            "seconds": seconds,
            "seeds": list(seeds),
            "columns": COLUMNS,
            "scoring": scoring,
            "runs": results,
        },
        f,
        indent=2,
    )
  return markdown


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  start = time.time()
  variants = variant_configs(
      steps=FLAGS.steps,
      sum_warmup=FLAGS.sum_warmup,
      size=FLAGS.size,
      world=FLAGS.world,
      data_dir=FLAGS.data_dir,
      towers=FLAGS.towers,
  )
  results = table.run_variants(variants, seeds, FLAGS.workdir)
  for variant, runs in results.items():
    for seed, run in zip(seeds, runs):
      run.update(
          global_scored_metrics(
              variants[variant](seed), os.path.join(FLAGS.workdir, variant, f"seed{seed}")
          )
      )
  command = (
      f"python -m experiments.selfalign_table --workdir={FLAGS.workdir} "
      f"--seeds={','.join(map(str, seeds))} --steps={FLAGS.steps} "
      f"--sum_warmup={FLAGS.sum_warmup} --size={FLAGS.size} --world={FLAGS.world}"
      + (f" --towers={FLAGS.towers}" if FLAGS.towers != "scratch" else "")
  )
  print(
      write_table(results, FLAGS.workdir, command=command, seconds=time.time() - start, seeds=seeds)
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
