"""Building blocks shared by the losses: cross-device gathers, labels and reductions."""

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


def mean_over_valid(values, valid, axis_name=None):
  """Mean of ``values`` over the ``valid`` entries of the whole batch (all devices), for losses.

  On each device returns local_sum * n_devices / global_count, so that ``pmean`` over the devices
  is the global mean (and its gradient the single-device gradient). Zero when nothing is valid.
  """
  valid = valid.astype(jnp.float32)
  total = jnp.sum(values * valid)
  count = jnp.sum(valid)
  n_devices = 1.0
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
    n_devices = jax.lax.psum(1.0, axis_name)
  return total * n_devices / jnp.maximum(count, 1.0)


def global_mean(values, valid=None, axis_name=None):
  """Mean over the valid entries of the global batch, the same value on every device (metrics)."""
  values = jnp.asarray(values, jnp.float32)
  valid = (
      jnp.ones(values.shape, jnp.float32)
      if valid is None
      else jnp.broadcast_to(valid, values.shape).astype(jnp.float32)
  )
  sums = jnp.stack([jnp.sum(values * valid), jnp.sum(valid)])
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums[0] / jnp.maximum(sums[1], 1.0)
