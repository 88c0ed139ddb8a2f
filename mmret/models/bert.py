"""BERT-style text encoder (post-LayerNorm): the tower of MiniLM / BGE sentence encoders.

  embeddings = LayerNorm(token + position + token_type[0])
  per block:   x = LayerNorm(x + attn(x));  x = LayerNorm(x + mlp(x))
Pooling: 'mean' over real tokens (sentence-transformers' MiniLM), 'cls' (BGE) or 'eos' (the
last real token). Same call signature and outputs as :class:`mmret.models.text.TextTransformer`.
"""

import flax.linen as nn
import jax.numpy as jnp

from mmret.models.layers import Attention, Dtype, MlpBlock, check_text, key_bias, pool_text


class BertBlock(nn.Module):
  heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu"
  ln_eps: float = 1e-12

  @nn.compact
  def __call__(self, x, attention_bias, *, train: bool):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y = Attention(self.heads, self.dropout, self.dtype, name="attn")(x, attention_bias, train=train)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_attn")(x + drop(y))
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.activation, name="mlp")(
        x, train=train
    )
    return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_mlp")(x + drop(y))


class BertEncoder(nn.Module):
  vocab_size: int
  max_len: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  pool: str = "mean"  # 'mean' | 'cls' | 'eos'
  causal: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu"
  ln_eps: float = 1e-12
  type_vocab_size: int = 2

  @nn.compact
  def __call__(self, text_ids, text_mask, *, train: bool = False):
    """text_ids [B,L] int, text_mask [B,L] bool -> dict(tokens=[B,L,w], pooled=[B,w])."""
    check_text(text_ids, self.max_len, self.pool)
    if self.causal:
      raise ValueError("the 'bert' text tower is bidirectional; set model.text_causal=False")
    length = text_ids.shape[1]
    x = nn.Embed(
        self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="token_embed"
    )(text_ids).astype(self.dtype)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, self.max_len, self.width))
    # Every text is one segment: token type 0 (what sentence encoders see at inference).
    types = self.param(
        "type_embed", nn.initializers.normal(0.02), (self.type_vocab_size, self.width)
    )
    x = x + pos[:, :length].astype(self.dtype) + types[0].astype(self.dtype)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="embed_ln")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    bias = key_bias(text_mask, self.dtype)
    for i in range(self.depth):
      x = BertBlock(
          self.heads,
          self.mlp_dim,
          self.dropout,
          self.dtype,
          self.activation,
          self.ln_eps,
          name=f"block{i}",
      )(x, bias, train=train)
    return {"tokens": x, "pooled": pool_text(x, text_mask, self.pool)}
