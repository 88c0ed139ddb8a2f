"""Loss registry.

A loss is a pure function ``fn(outputs, batch, *, axis_name=None, **hparams) -> (loss, metrics)``:
``outputs`` is the model's output dict, ``batch`` the per-device batch, ``axis_name`` the device axis
to gather other devices' samples over (None on a single device). A new loss is one function, one
``@register`` line and a test.
"""

import importlib
from typing import Callable

LossFn = Callable[..., tuple]
_REGISTRY: dict[str, LossFn] = {}
# Modules whose import registers losses; imported lazily so that `get` sees every loss.
_LOSS_MODULES = ("contrastive", "gcl", "selfalign", "solar")


def register(name: str):
  """Decorator registering a loss function under ``name``."""

  def wrap(fn):
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"loss {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn

  return wrap


def _import_all():
  for module in _LOSS_MODULES:
    try:
      importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{module}":
        raise


def get(name: str) -> LossFn:
  """Returns the loss registered as ``name``; the error lists the known names."""
  _import_all()
  if name not in _REGISTRY:
    raise KeyError(f"unknown loss {name!r}; registered losses: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def names() -> list[str]:
  _import_all()
  return sorted(_REGISTRY)
