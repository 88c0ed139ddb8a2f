"""Vision Transformer image tower: patches -> tokens [B,P,w] and a pooled vector [B,w].

Options for pretrained variants (defaults = mmret's own ViT):
  ``ln_pre``       LayerNorm on the embedded tokens before the blocks (OpenAI CLIP).
  ``layer_scale``  per-channel residual scales in every block (DINOv2).
  ``activation``   MLP non-linearity: 'gelu' | 'quick_gelu' (OpenAI CLIP) | ...
  ``ln_eps``       LayerNorm epsilon (1e-5 CLIP, 1e-6 DINOv2, 1e-12 Hugging Face ViT).
The final LayerNorm is applied to every token, so the pooled class token equals CLIP's
``ln_post(x[:, 0])`` and ViT/DINOv2's ``layernorm(x)[:, 0]``.
"""

import flax.linen as nn
import jax.numpy as jnp

from mmret.models.layers import Dtype, Encoder, check_pixels_normalized


class ViT(nn.Module):
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch_size: int
  pool: str = "cls"  # 'cls' (class token) or 'gap' (mean of patch tokens)
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  ln_pre: bool = False
  layer_scale: bool = False
  activation: str = "gelu"
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images [B,H,W,3] float -> dict(tokens=[B,P,w] patch tokens, pooled=[B,w])."""
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"ViT pool must be 'cls' or 'gap', got {self.pool!r}")
    check_pixels_normalized(images)
    x = nn.Conv(
        self.width,
        (self.patch_size,) * 2,
        strides=(self.patch_size,) * 2,
        padding="VALID",
        dtype=self.dtype,
        name="patch_embed",
    )(images.astype(self.dtype))
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], c))
    x = x + pos.astype(x.dtype)
    if self.ln_pre:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_pre")(x)
    x = Encoder(
        self.depth,
        self.heads,
        self.mlp_dim,
        self.dropout,
        self.dtype,
        self.activation,
        self.ln_eps,
        self.layer_scale,
        name="encoder",
    )(x, train=train)
    if self.pool == "cls":
      return {"tokens": x[:, 1:], "pooled": x[:, 0]}
    return {"tokens": x, "pooled": x.mean(axis=1)}
