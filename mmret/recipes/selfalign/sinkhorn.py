"""Sinkhorn-Knopp soft assignment of samples to prototypes (SwAV / SelfAlign style)."""

import jax
import jax.numpy as jnp


def sinkhorn(scores, *, epsilon=0.05, iterations=3, axis_name=None):
  """Balanced soft assignment Q [S,K] of S samples to K prototypes from similarity ``scores`` [S,K].

  Starts from exp(scores / epsilon) and alternately rescales so that every prototype receives the
  same total mass (1/K) and every sample distributes the same mass (1/S), ``iterations`` times,
  ending with the sample step; rows are returned as distributions (each sums to 1). Samples on other
  devices take part through ``psum`` over ``axis_name``, so a sharded call equals one call on the
  concatenated samples. No gradient flows through the assignment (it is a target).

  Args:
    scores: [S,K] sample-prototype similarities (e.g. cosine).
    epsilon: entropic regularisation; smaller gives sharper assignments.
    iterations: number of (prototype, sample) rescaling rounds.
    axis_name: device axis holding the other samples (None: one device).
  """
  scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
  n_prototypes = scores.shape[1]
  total = lambda x: x if axis_name is None else jax.lax.psum(x, axis_name)
  n_samples = total(jnp.asarray(scores.shape[0], jnp.float32))
  # One shift for all devices (it cancels in the normalisation) keeps exp() in range.
  shift = jnp.max(scores)
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  q = jnp.exp((scores - shift) / epsilon)
  q = q / total(jnp.sum(q))
  for _ in range(iterations):
    q = q / total(jnp.sum(q, axis=0, keepdims=True)) / n_prototypes
    q = q / jnp.sum(q, axis=1, keepdims=True) / n_samples
  return jax.lax.stop_gradient(q * n_samples)
