"""Recipes: everything one paper adds beyond the core, one folder each (nothing below imports them).

``solar/``      SOLAR: intersection masks (stage 1), masked views and multi-positive InfoNCE (stage 2),
                and the mask-quality evaluator.
``selfalign/``  SelfAlign: concept (prototypes + Sinkhorn) and context alignment, final similarity.
GCL needs no folder: its loss is a generic one (``mmret.losses.gcl``), run by the contrastive method.
"""
