"""Runs the evaluations a config lists and writes their reports.

Each entry of ``config.evals`` names one evaluation::

  config.evals.flickr = dict(type='caption5', dataset='mmret_world/tiny', split='caption5',
                             every=1000, batch_size=64, fold_size=None)
  config.evals.mbeir = dict(type='retrieval', dataset='/data/mbeir', split='test', every=0,
                            recall_k_by_pool=dict(fashioniq=10, fashion200k=10))

Fields: ``type`` (an evaluator of ``mmret.registry.EVALUATORS``), ``dataset``, ``split`` (for query/candidate protocols
the splits ``<split>_queries`` and ``<split>_candidates`` are read), ``every`` (run when
``step % every == 0``; 0 = only at the final evaluation), optional ``data_dir``, and every other
field goes to the evaluator (``batch_size``, ``search``, protocol options).
"""

import inspect
import os
from typing import Any, Callable, Mapping, Optional

import jax

from mmret.evals import report
from mmret.evals.evaluator import RECORDS, Evaluator

# Fields read by the runner; the rest are the evaluator's options.
RUNNER_FIELDS = ("type", "dataset", "split", "every", "data_dir")


def _plain(cfg) -> dict:
  """A ConfigDict or mapping as a plain dict (nested ConfigDicts included)."""
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def is_due(every: Optional[int], step: int, *, final: bool) -> bool:
  """Whether an evaluation with period ``every`` runs at ``step`` (always at the final one)."""
  return final or (bool(every) and step % int(every) == 0)


def _default_open_split():
  from mmret.data import sources  # The data package owns dataset opening.

  return sources.open_split


def open_eval_data(
    evaluator: Evaluator, dataset: str, split: str, data_dir: Optional[str], open_split: Callable
):
  """The ``data`` argument of ``evaluator``: one split, or the (queries, candidates) splits."""
  if evaluator.data == RECORDS:
    return open_split(dataset, split, data_dir)
  return (
      open_split(dataset, f"{split}_queries", data_dir),
      open_split(dataset, f"{split}_candidates", data_dir),
  )


def run_evals(
    predict_fn,
    evals_cfg: Mapping[str, Any],
    input_cfg: Any,
    step: int,
    workdir: Optional[str],
    *,
    evaluators: Callable[[str], Evaluator],
    params: Any = None,
    final: bool = False,
    data_dir: Optional[str] = None,
    open_split: Optional[Callable] = None,
    batches_fn: Optional[Callable] = None,
) -> dict[str, float]:
  """Runs the evaluations due at ``step`` and returns ``{'eval/<name>/<metric>': value}``.

  Args:
    predict_fn: ``predict_fn(params, batch) -> outputs``; create it once (it is jitted per object).
    evals_cfg: ``config.evals`` (name -> fields, see the module docstring).
    evaluators: evaluator type name -> Evaluator (``mmret.registry.evaluator``).
    input_cfg: preprocessing config passed to the batch pipeline.
    step: training step, recorded in the reports.
    workdir: where ``eval/<name>.{json,md,png}`` go (process 0 only), and the evaluator's own
      files under ``eval/<name>/``; None writes nothing.
    params: model parameters passed to predict_fn.
    final: run every evaluation regardless of ``every``.
    data_dir: default dataset directory (an evaluation's own ``data_dir`` wins).
    open_split, batches_fn: data access (default: mmret.data.sources.open_split and
      mmret.data.pipeline.eval_batches).
  """
  open_split = open_split or _default_open_split()
  flat = {}
  for name, cfg in _plain(evals_cfg).items():
    cfg = _plain(cfg)
    for field in ("type", "dataset", "split"):
      if field not in cfg:
        raise KeyError(f"config.evals.{name} has no {field!r} field (fields: {sorted(cfg)})")
    if not is_due(cfg.get("every", 0), step, final=final):
      continue
    evaluator = evaluators(cfg["type"])
    options = {key: value for key, value in cfg.items() if key not in RUNNER_FIELDS}
    accepted = set(inspect.signature(evaluator.evaluate).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
      raise ValueError(
          f"config.evals.{name}: unknown fields {unknown} for type "
          f"{cfg['type']!r}; it accepts {sorted(accepted - {'predict_fn', 'data'})}"
      )
    if batches_fn is not None:
      options.setdefault("batches_fn", batches_fn)
    data = open_eval_data(
        evaluator, cfg["dataset"], cfg["split"], cfg.get("data_dir", data_dir), open_split
    )
    # Each evaluation's own files (e.g. ranked lists) go to <workdir>/eval/<name>/.
    eval_dir = os.path.join(workdir, "eval", name) if workdir is not None else None
    metrics = evaluator.evaluate(
        predict_fn, data=data, input_cfg=input_cfg, workdir=eval_dir, params=params, **options
    )
    if workdir is not None and jax.process_index() == 0:
      report.write_reports(workdir, name, cfg["type"], step, metrics)
    flat.update({f"eval/{name}/{metric}": value for metric, value in metrics.items()})
  return flat
