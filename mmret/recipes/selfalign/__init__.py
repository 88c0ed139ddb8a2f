"""SelfAlign (arXiv 2308.14009): concept- and context-level alignment on top of VSE++.

sinkhorn.py   Sinkhorn-Knopp soft assignment of regions to prototypes
losses.py     concept alignment, context NCE, and ``selfalign_loss`` (VSE++ + both)
method.py     the forward, the final similarity and its packed retrieval vectors (``SELFALIGN``)
"""
