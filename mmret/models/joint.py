"""Joint encoder over [CLS; image tokens; text tokens] with per-token attention weights."""

import flax.linen as nn
import jax.numpy as jnp

from mmret.models.layers import Dtype, Encoder, key_bias


class JointEncoder(nn.Module):
  """Reads adapted image and/or text tokens (shared width) and returns the CLS output [B,w].

  ``image_weights`` [B,P] / ``text_weights`` [B,L] in [0,1] restrict what every token, CLS
  included, may attend to (1 = visible, 0 = hidden, in between = down-weighted); text padding is
  always hidden. Either modality may be absent (unimodal embeddings from the same encoder).
  """

  depth: int
  heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      image_tokens=None,
      text_tokens=None,
      text_mask=None,
      *,
      image_weights=None,
      text_weights=None,
      train: bool = False,
  ):
    if image_tokens is None and text_tokens is None:
      raise ValueError("JointEncoder needs image tokens, text tokens or both")
    ref = image_tokens if image_tokens is not None else text_tokens
    b, width = ref.shape[0], ref.shape[-1]
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, width))
    type_embed = self.param("type_embed", nn.initializers.normal(0.02), (2, width))
    parts = [jnp.tile(cls, (b, 1, 1)).astype(self.dtype)]
    weights = [jnp.ones((b, 1), jnp.float32)]
    if image_tokens is not None:
      parts.append((image_tokens + type_embed[0]).astype(self.dtype))
      weights.append(
          jnp.ones(image_tokens.shape[:2], jnp.float32)
          if image_weights is None
          else image_weights.astype(jnp.float32)
      )
    if text_tokens is not None:
      parts.append((text_tokens + type_embed[1]).astype(self.dtype))
      w = (
          jnp.ones(text_tokens.shape[:2], jnp.float32)
          if text_weights is None
          else text_weights.astype(jnp.float32)
      )
      if text_mask is not None:
        w = w * text_mask.astype(jnp.float32)
      weights.append(w)
    x = jnp.concatenate(parts, axis=1)
    bias = key_bias(jnp.concatenate(weights, axis=1), self.dtype)
    x = Encoder(self.depth, self.heads, self.mlp_dim, self.dropout, self.dtype, name="encoder")(
        x, bias, train=train
    )
    return x[:, 0]
