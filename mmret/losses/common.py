"""Building blocks shared by the losses: cross-device gathers and InfoNCE pieces."""

import jax
import jax.numpy as jnp


def gather(x, axis_name):
  """All samples of ``x`` [B,...] across the device axis, as [D*B,...] (identity on one device).

  The gradient flows through the gather: its transpose sums every device's cotangent for the
  local shard, so after ``pmean`` over devices the update equals the single-device one.
  """
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, tiled=True)


def global_offset(local_batch: int, axis_name):
  """Index of this device's first sample in the gathered batch."""
  if axis_name is None:
    return 0
  return jax.lax.axis_index(axis_name) * local_batch


def local_labels(local_batch: int, axis_name):
  """For each local row, the column of its own sample in the gathered batch."""
  return global_offset(local_batch, axis_name) + jnp.arange(local_batch)


def temperature_scale(outputs, hparams_temperature=None):
  """exp(logit_scale) from the model (learnable temperature) unless a fixed temperature is given."""
  if hparams_temperature is not None:
    return 1.0 / hparams_temperature
  return jnp.exp(outputs["logit_scale"])


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy of integer ``labels`` under ``logits`` [B,C]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
