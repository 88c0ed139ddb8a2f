"""Retrieval evaluation: embedding pass, exact and ScaNN search, metrics, protocols, reports.

``run_evals`` runs the evaluations of ``config.evals`` (see ``mmret.evals.runner``); evaluators are
registered by protocol type in ``mmret.evals.registry`` (``caption5``, ``retrieval``, ``mm2mm``,
``mmeb``, defined in ``mmret.evals.protocols``).
"""

from mmret.evals.registry import get, names, register
from mmret.evals.runner import run_evals

__all__ = ["get", "names", "register", "run_evals"]
