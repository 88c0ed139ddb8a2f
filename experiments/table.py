"""Running variants over seeds and writing mean ± std tables (shared by the paper-table modules)."""

import json
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from mmret import train


def run_variants(
    variants: Mapping[str, Callable[[int], object]], seeds: Sequence[int], workdir: str
) -> dict:
  """Trains+evaluates each variant for each seed; returns {variant: [final metrics per seed]}.

  ``variants`` maps a name to ``make_config(seed) -> ConfigDict``. Each run lives in
  ``workdir/<variant>/seed<k>`` and resumes (or is skipped when finished) if run again.
  """
  results = {}
  for name, make_config in variants.items():
    results[name] = []
    for seed in seeds:
      run_dir = os.path.join(workdir, name, f"seed{seed}")
      done = os.path.join(run_dir, "final_metrics.json")
      if os.path.exists(done):
        with open(done) as f:
          results[name].append(json.load(f))
        continue
      config = make_config(seed)
      results[name].append(train.run(config, run_dir))
      # Multi-stage runs write the last stage's metrics under its own directory.
      with open(done, "w") as f:
        json.dump(results[name][-1], f, indent=2)
  return results


def mean_std(values: Sequence[float]) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"


def markdown_table(
    results: Mapping[str, Sequence[Mapping[str, float]]], columns: Mapping[str, str]
) -> str:
  """Rows = variants, columns = {header: metric key}; cells are mean ± std over seeds."""
  headers = ["variant"] + list(columns)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for name, runs in results.items():
    cells = []
    for key in columns.values():
      missing = [i for i, run in enumerate(runs) if key not in run]
      if missing:
        raise KeyError(
            f"variant {name!r}: metric {key!r} missing in seed runs {missing}; "
            f"available: {sorted(runs[missing[0]])[:20]}"
        )
      cells.append(mean_std([run[key] for run in runs]))
    lines.append("| " + " | ".join([name] + cells) + " |")
  return "\n".join(lines) + "\n"
