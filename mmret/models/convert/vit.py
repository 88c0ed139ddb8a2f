"""ViT / DINOv2 checkpoints (Hugging Face ViTModel and Dinov2Model layouts) -> mmret ViT tower.

DINOv2 is recognised by its 'norm1' / 'layer_scale1' names and needs
``model.image.layer_scale=True`` and ``ln_eps=1e-6``; Hugging Face ViT uses ``ln_eps=1e-12``.
Position embeddings are interpolated when the configured image size differs from the
checkpoint's. The image projection, which these checkpoints do not have, starts as the identity
when it is square. Classification heads ('classifier.', 'pooler.') and DINOv2's mask token
(used only in its self-supervised pretraining) are skipped.
"""

from mmret.models.convert.common import (
    Assignment,
    Checkpoint,
    conv_kernel,
    fit_image_positions,
    identity_if_square,
)

TARGETS = ("image",)
PREFIXES = ("vit.", "dinov2.", "model.")
IGNORE = (r"^pooler\.", r"^classifier\.", r"mask_token$", r"position_ids$")


def convert(ckpt: Checkpoint, targets, shapes: dict):
  del targets  # image only
  out = Assignment()
  t = "image_tower"
  dinov2 = ckpt.has("encoder.layer.0.norm1.weight")
  out.put(f"{t}/cls", ckpt.take("embeddings.cls_token"))
  out.put(
      f"{t}/pos_embed",
      fit_image_positions(
          ckpt.take("embeddings.position_embeddings"), shapes.get(f"{t}/pos_embed", (1, 0, 0))[1]
      ),
  )
  out.put(
      f"{t}/patch_embed/kernel",
      conv_kernel(ckpt.take("embeddings.patch_embeddings.projection.weight")),
  )
  out.put(f"{t}/patch_embed/bias", ckpt.take("embeddings.patch_embeddings.projection.bias"))
  for i in range(ckpt.count(r"encoder\.layer\.(\d+)\.")):
    s, d = f"encoder.layer.{i}", f"{t}/encoder/block{i}"
    for name in ("query", "key", "value"):
      out.linear(f"{d}/attn/{name}", ckpt, f"{s}.attention.attention.{name}")
    out.linear(f"{d}/attn/out", ckpt, f"{s}.attention.output.dense")
    if dinov2:
      out.layer_norm(f"{d}/ln1", ckpt, f"{s}.norm1")
      out.layer_norm(f"{d}/ln2", ckpt, f"{s}.norm2")
      out.linear(f"{d}/mlp/fc1", ckpt, f"{s}.mlp.fc1")
      out.linear(f"{d}/mlp/fc2", ckpt, f"{s}.mlp.fc2")
      out.put(f"{d}/ls1", ckpt.take(f"{s}.layer_scale1.lambda1"))
      out.put(f"{d}/ls2", ckpt.take(f"{s}.layer_scale2.lambda1"))
    else:
      out.layer_norm(f"{d}/ln1", ckpt, f"{s}.layernorm_before")
      out.layer_norm(f"{d}/ln2", ckpt, f"{s}.layernorm_after")
      out.linear(f"{d}/mlp/fc1", ckpt, f"{s}.intermediate.dense")
      out.linear(f"{d}/mlp/fc2", ckpt, f"{s}.output.dense")
  out.layer_norm(f"{t}/encoder/ln_final", ckpt, "layernorm")
  out.put("image_proj/kernel", identity_if_square(shapes.get("image_proj/kernel")))
  return out, ckpt.unused(("",), IGNORE)
