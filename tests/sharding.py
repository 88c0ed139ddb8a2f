"""Test helper: a function of (params, inputs) on 8 devices (inputs split, pmean) vs one device."""

import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

N_DEVICES = 8


def assert_sharded_equals_single(fn, params, inputs, *, rtol=1e-5, atol=1e-7):
  """``fn(params, inputs, axis_name=None) -> scalar``: value and gradient w.r.t. ``params`` with
  ``inputs`` split over 8 devices (pmean of both) equal the single-device ones on all inputs.

  Also checks that the gradient is not zero everywhere (else the comparison proves nothing).
  """
  single_value, single_grad = jax.value_and_grad(fn)(params, inputs)

  def per_device(p, x):
    value, grad = jax.value_and_grad(functools.partial(fn, axis_name="d"))(p, x)
    return jax.lax.pmean(value, "d"), jax.lax.pmean(grad, "d")

  mesh = jax.make_mesh((N_DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  mapped = jax.jit(
      jax.shard_map(
          per_device, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P()), check_vma=False
      )
  )
  value, grad = jax.block_until_ready(mapped(params, inputs))
  np.testing.assert_allclose(value, single_value, rtol=rtol)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(single_grad)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(single_grad))
