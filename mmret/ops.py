"""Array helpers shared by the encoders, the losses and the recipes (one definition each)."""

import jax.numpy as jnp

# A logit or attention bias for an entry that must not count: finite, so that a row with nothing
# left stays NaN-free under grad (it then spreads uniformly, and callers mask its result).
NEG_INF = -1e9


def l2_normalize(x, eps=1e-6):
  """x / |x| along the last axis, in float32; vectors shorter than ``eps`` are divided by eps."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def masked_mean(x, mask):
  """Mean of x [B,T,D] over the positions where mask [B,T] is set (zero where none is)."""
  m = mask.astype(x.dtype)[..., None]
  return (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
