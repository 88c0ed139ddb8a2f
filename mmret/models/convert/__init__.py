"""Checkpoint converters, by kind: state dict (numpy, the checkpoint's names) -> mmret params.

Each kind's module defines ``TARGETS`` (the towers it can fill), ``PREFIXES`` (wrappers to strip
from names, e.g. 'module.', optional) and ``convert(ckpt, targets, shapes) -> (assignment,
unused names)``, where ``shapes`` maps mmret parameter paths to their shapes.
"""

from mmret.models.convert import bert, clip, efficientnet, vit

CONVERTERS = {
    "clip": clip,
    "bert": bert,
    "vit": vit,
    "efficientnet_lite0": efficientnet,
}
