"""Vision Transformer image tower: patches -> tokens [B,P,w] and a pooled vector [B,w]."""
import flax.linen as nn
import jax.numpy as jnp

from mmret.models.layers import Dtype, Encoder


class ViT(nn.Module):
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch_size: int
  pool: str = "cls"  # 'cls' (class token) or 'gap' (mean of patch tokens)
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images [B,H,W,3] float -> dict(tokens=[B,P,w] patch tokens, pooled=[B,w])."""
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"ViT pool must be 'cls' or 'gap', got {self.pool!r}")
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", dtype=self.dtype, name="patch_embed")(images.astype(self.dtype))
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], c))
    x = x + pos.astype(x.dtype)
    x = Encoder(self.depth, self.heads, self.mlp_dim, self.dropout, self.dtype,
                name="encoder")(x, train=train)
    if self.pool == "cls":
      return {"tokens": x[:, 1:], "pooled": x[:, 0]}
    return {"tokens": x, "pooled": x.mean(axis=1)}
