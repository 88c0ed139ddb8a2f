"""BERT-family checkpoints (Hugging Face BertModel layout: MiniLM, BGE, ...) -> mmret 'bert' tower.

Sentence-transformers models save exactly this layout (plus pooling settings outside the
weights: choose ``model.text_pool`` 'mean' for all-MiniLM-*, 'cls' for BGE). The pretraining
heads ('pooler.', 'cls.') are not part of the encoder and are skipped. The text projection,
which such checkpoints do not have, starts as the identity when it is square.
"""

from mmret.models.convert.common import (
    Assignment,
    Checkpoint,
    fit_text_positions,
    identity_if_square,
)

TARGETS = ("text",)
PREFIXES = ("bert.", "model.", "0.auto_model.")
IGNORE = (r"position_ids$", r"^pooler\.", r"^cls\.")


def convert(ckpt: Checkpoint, targets, shapes: dict):
  del targets  # text only
  out = Assignment()
  t = "text_tower"
  out.put(f"{t}/token_embed/embedding", ckpt.take("embeddings.word_embeddings.weight"))
  out.put(
      f"{t}/pos_embed",
      fit_text_positions(
          ckpt.take("embeddings.position_embeddings.weight"),
          shapes.get(f"{t}/pos_embed", (1, 0, 0))[1],
      ),
  )
  out.put(f"{t}/type_embed", ckpt.take("embeddings.token_type_embeddings.weight"))
  out.layer_norm(f"{t}/embed_ln", ckpt, "embeddings.LayerNorm")
  for i in range(ckpt.count(r"encoder\.layer\.(\d+)\.")):
    s, d = f"encoder.layer.{i}", f"{t}/block{i}"
    for name in ("query", "key", "value"):
      out.linear(f"{d}/attn/{name}", ckpt, f"{s}.attention.self.{name}")
    out.linear(f"{d}/attn/out", ckpt, f"{s}.attention.output.dense")
    out.layer_norm(f"{d}/ln_attn", ckpt, f"{s}.attention.output.LayerNorm")
    out.linear(f"{d}/mlp/fc1", ckpt, f"{s}.intermediate.dense")
    out.linear(f"{d}/mlp/fc2", ckpt, f"{s}.output.dense")
    out.layer_norm(f"{d}/ln_mlp", ckpt, f"{s}.output.LayerNorm")
  out.put("text_proj/kernel", identity_if_square(shapes.get("text_proj/kernel")))
  return out, ckpt.unused(("",), IGNORE)
