"""Retrieval evaluation: embedding pass, exact and ScaNN search, metrics, protocols, reports.

``runner.run_evals`` runs the evaluations of ``config.evals``; the evaluators (``protocols``:
``caption5``, ``retrieval``, ``mm2mm``, ``mmeb``; ``modality_gap``; recipes' own, e.g. SOLAR's
``solar_masks``) are listed by type name in ``mmret.registry.EVALUATORS``.
"""
