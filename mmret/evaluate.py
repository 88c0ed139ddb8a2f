"""Evaluates a trained checkpoint, or a freshly initialised model, without training.

  python -m mmret.evaluate --config=configs/clip.py --workdir=/tmp/run
  python -m mmret.evaluate --config=configs/clip.py --checkpoint=none --out=/tmp/init_eval
  python -m mmret.evaluate --config=configs/clip.py --workdir=/tmp/run \
      --eval_type=caption5 --eval_dataset=/data/mmret/flickr30k --eval_split=test

The config gives the model, preprocessing and (unless --eval_type is given) the evaluations of
``config.evals``; ``--eval_*`` flags evaluate one prepared dataset instead (any directory made by
``python -m mmret.prepare``, or an embedded ``mmret_world/...`` name). Reports go to ``--out``
(default: ``<workdir>/eval_only``): ``eval/<name>.{json,md,png}`` and ``metrics.json``. The
command prints one line of headline figures per evaluation (the metrics the training log shows,
``mmret.train.HEADLINE_METRICS``) and where the reports are.
Multi-stage recipes are evaluated with their last stage's parameters.
"""

import json
import os

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from mmret import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training run directory holding checkpoints (local path or gs://...)."
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "latest", "'latest', a step number, or 'none' (freshly initialised)."
)
_OUT = flags.DEFINE_string("out", None, "Report directory (default <workdir>/eval_only).")
_EVAL_TYPE = flags.DEFINE_string("eval_type", None, "Evaluator type (caption5, retrieval, ...).")
_EVAL_DATASET = flags.DEFINE_string("eval_dataset", None, "Prepared dataset path or name.")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", None, "Split (retrieval: prefix of _queries).")


def _evals_config(config):
  if _EVAL_TYPE.value is None:
    if not config.evals:
      raise app.UsageError("the config has no evals; pass --eval_type/--eval_dataset/--eval_split")
    return config.evals.to_dict()
  if not (_EVAL_DATASET.value and _EVAL_SPLIT.value):
    raise app.UsageError("--eval_type needs --eval_dataset and --eval_split")
  name = f"{_EVAL_TYPE.value}_{os.path.basename(_EVAL_DATASET.value.rstrip('/'))}"
  return {
      name: {"type": _EVAL_TYPE.value, "dataset": _EVAL_DATASET.value, "split": _EVAL_SPLIT.value}
  }


def evaluate(config, *, workdir, checkpoint, out, evals_cfg):
  """Runs ``evals_cfg`` on the chosen parameters; returns the flat metrics dict."""
  import jax
  from mmret import checkpoint as ckpt_lib
  from mmret import registry, step as step_lib, train
  from mmret.evals import runner

  stage, run_dir = train.last_stage(config, workdir or "")
  setup = train.Setup(stage)
  mapping = step_lib.DeviceMapping(stage.mapping)
  step = 0
  if checkpoint == "none":
    params = setup.init_state(stage, mapping).params
  else:
    if workdir is None:
      raise app.UsageError("--workdir is needed unless --checkpoint=none")
    checkpointer = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
      step = checkpointer.latest_step() if checkpoint == "latest" else int(checkpoint)
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
      params = checkpointer.restore(setup.abstract_state(mapping), step=step).params
    finally:
      checkpointer.close()
  results = runner.run_evals(
      setup.predict,
      evals_cfg,
      stage.input,
      step,
      out,
      evaluators=registry.evaluator,
      params=params,
      final=True,
      data_dir=stage.input.data_dir,
  )
  if jax.process_index() == 0:
    with (epath.Path(out) / "metrics.json").open("w") as f:
      json.dump({"step": step, "checkpoint": checkpoint, **results}, f, indent=2)
  return results


def summary_lines(results, eval_names, out, headline_metrics=None) -> list[str]:
  """What the command prints: per evaluation its headline figures (``eval/<name>/<metric>``
  whose last component is in ``headline_metrics``, default ``mmret.train.HEADLINE_METRICS``),
  then the metric count and the report directory."""
  from mmret.evals import report

  if headline_metrics is None:
    from mmret.train import HEADLINE_METRICS as headline_metrics

  lines = []
  for name in eval_names:
    prefix = f"eval/{name}/"
    headline = {
        key[len(prefix) :]: value
        for key, value in results.items()
        if key.startswith(prefix) and key.rsplit("/", 1)[1] in headline_metrics
    }
    if headline:
      figures = " | ".join(
          f"{metric} {headline[metric]:.2f}" for metric in sorted(headline, key=report.natural_key)
      )
    else:
      figures = f"no headline metric; every metric is in {os.path.join(out, 'eval', name)}.md"
    lines.append(f"{name}: {figures}")
  lines.append(f"{len(results)} metrics; reports in {os.path.join(out, 'eval')}")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup_logging()
  runtime.initialize_jax()
  out = _OUT.value or (os.path.join(_WORKDIR.value, "eval_only") if _WORKDIR.value else None)
  if out is None:
    raise app.UsageError("give --out (or --workdir)")
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  evals_cfg = _evals_config(_CONFIG.value)
  results = evaluate(
      _CONFIG.value,
      workdir=_WORKDIR.value,
      checkpoint=_CHECKPOINT.value,
      out=out,
      evals_cfg=evals_cfg,
  )
  for line in summary_lines(results, list(evals_cfg), out):
    print(line)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
