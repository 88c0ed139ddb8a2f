"""Training methods: what a recipe does beyond "apply the model, then a registered loss".

A method supplies the train-time forward pass (e.g. SOLAR computes intersection masks, then runs
the joint encoder under them), the inference-time outputs used for retrieval, and the frozen
parameters it reads (e.g. a distillation teacher). ``config.method.name`` selects one; the other
fields of ``config.method`` are its hyper-parameters. The pure array functions the methods are
built from live beside this file (``solar.py``, ``sinkhorn.py``).
"""

import dataclasses
import importlib
from typing import Any, Callable

# forward(params, frozen, batch, *, rng, step) -> outputs   (training)
# predict(params, batch) -> outputs                          (retrieval: z_image, z_text, z_joint)
ForwardFn = Callable[..., dict]
PredictFn = Callable[[Any, dict], dict]


@dataclasses.dataclass(frozen=True)
class Method:
  make_forward: Callable[..., ForwardFn]  # (model, **hparams) -> forward
  make_predict: Callable[..., PredictFn]  # (model, **hparams) -> predict
  init_frozen: Callable[..., Any]  # (model, params, **hparams) -> frozen pytree


_REGISTRY: dict[str, Method] = {}
# Modules whose import registers methods.
_METHOD_MODULES = ("solar_recipe", "selfalign_recipe")


def register(name: str, method: Method) -> Method:
  if name in _REGISTRY and _REGISTRY[name] is not method:
    raise ValueError(f"method {name!r} is registered twice")
  _REGISTRY[name] = method
  return method


def get(name: str) -> Method:
  for module in _METHOD_MODULES:
    try:
      importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{module}":
        raise
  if name not in _REGISTRY:
    raise KeyError(f"unknown method {name!r}; registered methods: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def _contrastive_forward(model):
  def forward(params, frozen, batch, *, rng, step):
    del frozen, step
    return model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})

  return forward


def _contrastive_predict(model):
  def predict(params, batch):
    return model.apply({"params": params}, batch, train=False)

  return predict


# The plain recipe: the model's outputs go straight to the loss.
register(
    "contrastive",
    Method(
        make_forward=_contrastive_forward,
        make_predict=_contrastive_predict,
        init_frozen=lambda model, params: {},
    ),
)
