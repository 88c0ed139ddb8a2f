"""CLIP checkpoints (OpenAI / open_clip and Hugging Face layouts) -> mmret ViT + text towers.

OpenAI and open_clip share one layout ('visual.transformer.resblocks.N...', fused attention
in-projections); Hugging Face's CLIPModel uses 'vision_model.encoder.layers.N...'. The layout is
recognised from the names. CLIP's patch embedding has no bias: mmret's is set to zero.
"""

import numpy as np

from mmret.models.convert.common import (
    Assignment,
    Checkpoint,
    conv_kernel,
    fit_image_positions,
    fit_text_positions,
    split_qkv,
    transpose,
)

TARGETS = ("image", "text")
IGNORE = (r"position_ids$", r"^(input_resolution|context_length|vocab_size)$", r"attn_mask$")


def _is_hf(ckpt: Checkpoint) -> bool:
  return any(k.startswith(("vision_model.", "text_model.")) for k in ckpt.tensors)


def _openai_blocks(out: Assignment, ckpt: Checkpoint, src: str, dst: str):
  depth = ckpt.count(rf"{src}\.resblocks\.(\d+)\.")
  for i in range(depth):
    s, d = f"{src}.resblocks.{i}", f"{dst}/block{i}"
    out.layer_norm(f"{d}/ln1", ckpt, f"{s}.ln_1")
    out.layer_norm(f"{d}/ln2", ckpt, f"{s}.ln_2")
    weights = split_qkv(ckpt.take(f"{s}.attn.in_proj_weight"))
    biases = split_qkv(ckpt.take(f"{s}.attn.in_proj_bias"))
    for name, w, b in zip(("query", "key", "value"), weights, biases):
      out.put(f"{d}/attn/{name}/kernel", transpose(w))
      out.put(f"{d}/attn/{name}/bias", b)
    out.linear(f"{d}/attn/out", ckpt, f"{s}.attn.out_proj")
    out.linear(f"{d}/mlp/fc1", ckpt, f"{s}.mlp.c_fc")
    out.linear(f"{d}/mlp/fc2", ckpt, f"{s}.mlp.c_proj")


def _hf_blocks(out: Assignment, ckpt: Checkpoint, src: str, dst: str):
  depth = ckpt.count(rf"{src}\.layers\.(\d+)\.")
  for i in range(depth):
    s, d = f"{src}.layers.{i}", f"{dst}/block{i}"
    out.layer_norm(f"{d}/ln1", ckpt, f"{s}.layer_norm1")
    out.layer_norm(f"{d}/ln2", ckpt, f"{s}.layer_norm2")
    for name, proj in (
        ("query", "q_proj"),
        ("key", "k_proj"),
        ("value", "v_proj"),
        ("out", "out_proj"),
    ):
      out.linear(f"{d}/attn/{name}", ckpt, f"{s}.self_attn.{proj}")
    out.linear(f"{d}/mlp/fc1", ckpt, f"{s}.mlp.fc1")
    out.linear(f"{d}/mlp/fc2", ckpt, f"{s}.mlp.fc2")


def _image(out: Assignment, ckpt: Checkpoint, shapes: dict, hf: bool):
  pos_tokens = shapes.get("image_tower/pos_embed", (1, 0, 0))[1]
  if hf:
    e = "vision_model.embeddings"
    patch, cls = ckpt.take(f"{e}.patch_embedding.weight"), ckpt.take(f"{e}.class_embedding")
    pos = ckpt.take(f"{e}.position_embedding.weight")
    out.layer_norm("image_tower/ln_pre", ckpt, "vision_model.pre_layrnorm")
    _hf_blocks(out, ckpt, "vision_model.encoder", "image_tower/encoder")
    out.layer_norm("image_tower/encoder/ln_final", ckpt, "vision_model.post_layernorm")
    out.put("image_proj/kernel", transpose(ckpt.take("visual_projection.weight")))
  else:
    patch, cls = ckpt.take("visual.conv1.weight"), ckpt.take("visual.class_embedding")
    pos = ckpt.take("visual.positional_embedding")
    out.layer_norm("image_tower/ln_pre", ckpt, "visual.ln_pre")
    _openai_blocks(out, ckpt, "visual.transformer", "image_tower/encoder")
    out.layer_norm("image_tower/encoder/ln_final", ckpt, "visual.ln_post")
    out.put("image_proj/kernel", ckpt.take("visual.proj"))
  out.put("image_tower/patch_embed/kernel", conv_kernel(patch))
  if patch is not None:
    out.put("image_tower/patch_embed/bias", np.zeros(patch.shape[0], np.float32))
  out.put("image_tower/cls", None if cls is None else cls.reshape(1, 1, -1))
  out.put("image_tower/pos_embed", fit_image_positions(pos, pos_tokens))


def _text(out: Assignment, ckpt: Checkpoint, shapes: dict, hf: bool):
  length = shapes.get("text_tower/pos_embed", (1, 0, 0))[1]
  if hf:
    e = "text_model.embeddings"
    out.put("text_tower/token_embed/embedding", ckpt.take(f"{e}.token_embedding.weight"))
    pos = ckpt.take(f"{e}.position_embedding.weight")
    _hf_blocks(out, ckpt, "text_model.encoder", "text_tower/encoder")
    out.layer_norm("text_tower/encoder/ln_final", ckpt, "text_model.final_layer_norm")
    out.put("text_proj/kernel", transpose(ckpt.take("text_projection.weight")))
  else:
    out.put("text_tower/token_embed/embedding", ckpt.take("token_embedding.weight"))
    pos = ckpt.take("positional_embedding")
    _openai_blocks(out, ckpt, "transformer", "text_tower/encoder")
    out.layer_norm("text_tower/encoder/ln_final", ckpt, "ln_final")
    out.put("text_proj/kernel", ckpt.take("text_projection"))
  out.put("text_tower/pos_embed", fit_text_positions(pos, length))


def convert(ckpt: Checkpoint, targets, shapes: dict):
  """-> (Assignment, checkpoint names under the targets' prefixes that were not used)."""
  hf = _is_hf(ckpt)
  out = Assignment()
  prefixes = []
  if "image" in targets:
    _image(out, ckpt, shapes, hf)
    prefixes += ["vision_model.", "visual_projection."] if hf else ["visual."]
  if "text" in targets:
    _text(out, ckpt, shapes, hf)
    prefixes += (
        ["text_model.", "text_projection."]
        if hf
        else [
            "token_embedding.",
            "positional_embedding",
            "transformer.",
            "ln_final.",
            "text_projection",
        ]
    )
  if set(TARGETS) <= set(targets):  # the temperature belongs to the pair of towers
    out.put(
        "logit_scale",
        ckpt.take("logit_scale").reshape(())
        if ckpt.has("logit_scale")
        else ckpt.take("logit_scale"),
    )
    prefixes.append("logit_scale")
  return out, ckpt.unused(prefixes, IGNORE)
