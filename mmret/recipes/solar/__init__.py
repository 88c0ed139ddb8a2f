"""SOLAR (arXiv 2605.15868): symmetric multimodal-to-multimodal retrieval in two stages.

masks.py      token scores, the density-crossing threshold, ``fit_masks`` (the one mask fitting
              both stages and the evaluator use), annealing, random masks, ground-truth labels
segments.py   grouping image patches into segments (k-means on features + grid position)
views.py      stage 2's positive and hard-negative views over text tokens and image segments
losses.py     GLA, local/global correlation distillation, the stage-1 and stage-2 losses
method.py     the stages' forward / predict / frozen parameters (``STAGE1``, ``STAGE2``)
evaluator.py  ``solar_masks``: mask quality against the embedded world's ground truth
"""
