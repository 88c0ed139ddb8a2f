"""Every loss, method and evaluator mmret runs, under the name configs give it: one table each.

A new loss is one function, one line in ``LOSSES`` and a test; a new recipe adds its method (and
its own evaluators) here. Recipes that train with their own loss (SOLAR's stages, SelfAlign) carry
it in their ``Method``; the others name a loss of ``LOSSES`` in ``config.loss.name``.
"""

from mmret import methods
from mmret.evals import covr, modality_gap, protocols
from mmret.losses import contrastive, gcl, vsepp
from mmret.recipes.selfalign import method as selfalign
from mmret.recipes.solar import evaluator as solar_evaluator
from mmret.recipes.solar import method as solar

LOSSES = {
    "clip": contrastive.clip_loss,  # image <-> text InfoNCE
    "cl": contrastive.clip_loss,  # the same, under the GCL paper's name
    "gcl": gcl.gcl_loss,
    "pairwise": gcl.pairwise_loss,
    "vsepp": vsepp.vsepp_loss,
}

METHODS = {
    "contrastive": methods.CONTRASTIVE,  # the model's outputs go to config.loss.name
    "solar_stage1": solar.STAGE1,
    "solar_stage2": solar.STAGE2,
    "selfalign": selfalign.SELFALIGN,
}

EVALUATORS = {
    "caption5": protocols.CAPTION5,
    "retrieval": protocols.RETRIEVAL,
    "mm2mm": protocols.MM2MM,
    "mmeb": protocols.MMEB,
    "covr": covr.COVR,
    "modality_gap": modality_gap.MODALITY_GAP,
    "solar_masks": solar_evaluator.SOLAR_MASKS,
}


def _lookup(table: dict, kind: str, name: str):
  if name not in table:
    raise KeyError(f"unknown {kind} {name!r}; known: {sorted(table)}")
  return table[name]


def loss(name: str):
  return _lookup(LOSSES, "loss", name)


def method(name: str) -> methods.Method:
  return _lookup(METHODS, "method", name)


def evaluator(name: str):
  return _lookup(EVALUATORS, "evaluator type", name)
