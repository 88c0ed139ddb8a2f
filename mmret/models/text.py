"""Transformer text tower (pre-LayerNorm, as CLIP's) with a padding mask and configurable pooling.

``activation`` ('gelu' | 'quick_gelu' for OpenAI CLIP) and ``ln_eps`` (1e-5 for CLIP) match
pretrained checkpoints; with ``causal=True`` and ``pool='eos'`` this is CLIP's text encoder (the
end token is the last real token of mmret's tokenizers, where CLIP pools).
"""

import flax.linen as nn
import jax.numpy as jnp

from mmret.models.layers import Dtype, Encoder, check_text, causal_bias, key_bias, pool_text


class TextTransformer(nn.Module):
  vocab_size: int
  max_len: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  pool: str = "eos"  # 'eos' (last real token, CLIP), 'cls' (first token, BERT) or 'mean'
  causal: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu"
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, text_ids, text_mask, *, train: bool = False):
    """text_ids [B,L] int, text_mask [B,L] bool -> dict(tokens=[B,L,w], pooled=[B,w])."""
    check_text(text_ids, self.max_len, self.pool)
    length = text_ids.shape[1]
    x = nn.Embed(
        self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="token_embed"
    )(text_ids).astype(self.dtype)
    pos = self.param("pos_embed", nn.initializers.normal(0.01), (1, self.max_len, self.width))
    x = x + pos[:, :length].astype(self.dtype)
    bias = key_bias(text_mask, self.dtype)
    if self.causal:
      bias = bias + causal_bias(length, self.dtype)
    x = Encoder(
        self.depth,
        self.heads,
        self.mlp_dim,
        self.dropout,
        self.dtype,
        self.activation,
        self.ln_eps,
        name="encoder",
    )(x, bias, train=train)
    return {"tokens": x, "pooled": pool_text(x, text_mask, self.pool)}
