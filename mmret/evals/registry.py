"""Evaluator registry: protocol type name -> evaluate function and the data it reads.

An evaluator is ``evaluate(predict_fn, *, data, input_cfg, workdir=None, **cfg) -> dict of
metrics``. ``data`` is either one random-access sequence of records (``data='records'``, e.g.
caption5) or a ``(queries, candidates)`` pair of sequences (``data='queries_candidates'``).
"""

import dataclasses
import importlib
from typing import Callable

DATA_KINDS = ("records", "queries_candidates")
# Modules whose import registers evaluators; imported lazily so that `get` sees them all.
_EVALUATOR_MODULES = (
    "mmret.evals.protocols",
    "mmret.evals.modality_gap",
    "mmret.evals.solar_masks",
)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  name: str
  evaluate: Callable[..., dict]
  data: str  # one of DATA_KINDS


_REGISTRY: dict[str, Evaluator] = {}


def register(name: str, *, data: str):
  """Decorator registering an evaluate function under the protocol type ``name``."""
  if data not in DATA_KINDS:
    raise ValueError(f"evaluator {name!r}: data must be one of {DATA_KINDS}, got {data!r}")

  def wrap(fn):
    if name in _REGISTRY and _REGISTRY[name].evaluate is not fn:
      raise ValueError(f"evaluator {name!r} is registered twice")
    _REGISTRY[name] = Evaluator(name, fn, data)
    return fn

  return wrap


def _import_all():
  for module in _EVALUATOR_MODULES:
    importlib.import_module(module)


def get(name: str) -> Evaluator:
  """The evaluator registered as ``name``; the error lists the known names."""
  _import_all()
  if name not in _REGISTRY:
    raise KeyError(f"unknown evaluator type {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def names() -> list[str]:
  _import_all()
  return sorted(_REGISTRY)
