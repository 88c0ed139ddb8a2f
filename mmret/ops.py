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


def normalize_pixels(image, mean, std):
  """uint8 pixels [..., 3] -> float32 ``(x / 255 - mean) / std`` per channel.

  Batches carry images as uint8 (a quarter of float32's bytes from host to device) and the
  jitted step or embedding pass normalises them here. Float images are taken as already
  normalised and returned unchanged (e.g. the zeros used to initialise a model).
  """
  if image.dtype != jnp.uint8:
    return image
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (image.astype(jnp.float32) / 255.0 - mean) / std


def with_normalized_pixels(batch: dict, mean, std) -> dict:
  """``batch`` with its uint8 ``image`` (if any) normalised by :func:`normalize_pixels`."""
  if batch.get("image") is None or isinstance(batch["image"], dict):
    return batch
  return dict(batch, image=normalize_pixels(batch["image"], mean, std))
