"""The contrastive train step: one per-device body, mapped over devices with pmap or shard_map.

The body is written for one device's slice of the global batch. With ``axis_name`` set, losses
gather the other devices' samples over that axis and the body averages gradients with
``lax.pmean``; with ``axis_name=None`` it is the plain single-device step.
"""

import collections
import copy
import functools
from typing import Any, Callable

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mmret import gradcache, optim

AXIS = "batch"
MAPPINGS = ("pmap", "shard_map")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any  # trained parameters
  opt_state: Any
  rng: jax.Array  # base PRNG key; each step folds in the step index
  frozen: Any  # parameters read but never updated (e.g. a distillation teacher)


def train_step(
    state: TrainState,
    batch,
    *,
    forward,
    loss_fn,
    tx,
    lr_schedule,
    axis_name=None,
    frozen_mask=None,
    microbatches=1,
):
  """One optimisation step on this device's batch; returns (new state, metrics).

  ``forward(params, frozen, batch, *, rng, step, axis_name) -> outputs`` (see ``mmret.methods``)
  and ``loss_fn(outputs, batch, *, axis_name) -> (loss, metrics)`` (see ``mmret.losses``).
  ``frozen_mask`` (``optim.frozen_mask``): parameters whose gradient is never computed.
  The step's key is the same on every device: methods fold in each example's global index where
  examples need their own randomness, so the step does not depend on the device count.
  ``microbatches`` > 1: the same gradient from that many micro-batches (``mmret.gradcache``;
  the forward must be per-example), with one micro-batch's activations held at a time.
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def objective(params):
    if frozen_mask is not None:
      params = jax.tree.map(
          lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p, params, frozen_mask
      )
    outputs = forward(params, state.frozen, batch, rng=rng, step=state.step, axis_name=axis_name)
    return loss_fn(outputs, batch, axis_name=axis_name)

  if microbatches > 1:
    (loss, metrics), grads = gradcache.value_and_grad(
        state.params,
        state.frozen,
        batch,
        forward=forward,
        loss_fn=loss_fn,
        microbatches=microbatches,
        rng=rng,
        step=state.step,
        axis_name=axis_name,
        frozen_mask=frozen_mask,
    )
  else:
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  metrics = dict(metrics, loss=loss)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update(grad_norm=optim.global_norm(grads), lr=lr_schedule(state.step))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


class DeviceMapping:
  """Maps the per-device step over all devices, and moves state and batches to match.

  The *canonical* state (what init makes and checkpoints hold) is replicated over a 1-D mesh of
  all devices. ``pmap`` keeps its own layout (a leading local-device axis); ``shard_map`` runs
  on the canonical layout directly.
  """

  def __init__(self, kind: str):
    if kind not in MAPPINGS:
      raise ValueError(f"mapping must be one of {MAPPINGS}, got {kind!r}")
    self.kind = kind
    self.mesh = jax.make_mesh(
        (jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(AXIS))
    self.local_devices = jax.local_devices()

  def compile(self, step_body) -> Callable:
    """``step_body(state, batch, *, axis_name)`` -> jitted fn(native state, native batch)."""
    body = functools.partial(step_body, axis_name=AXIS)
    if self.kind == "pmap":
      return jax.pmap(body, axis_name=AXIS, donate_argnums=(0,))
    mapped = jax.shard_map(
        body, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(mapped, donate_argnums=(0,))

  def put_state(self, state):
    """Canonical (replicated) state -> the mapping's layout."""
    if self.kind == "shard_map":
      return state
    n = len(self.local_devices)

    # Placed as pmap places its outputs (a leading local-device axis, one row per device), so
    # the first step and every later one share one compiled program: a host array here would
    # make the second step trace and compile the step again.
    stacked = NamedSharding(jax.sharding.Mesh(np.array(self.local_devices), (AXIS,)), P(AXIS))

    def per_device(x):
      return jax.device_put(
          np.broadcast_to(np.asarray(x.addressable_data(0)), (n,) + x.shape), stacked
      )

    return jax.tree.map(per_device, state)

  def get_state(self, state):
    """The mapping's layout -> canonical replicated state (for checkpoints and evaluation)."""
    if self.kind == "shard_map":
      return state

    def canonical(x):
      shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
      copies = [s.data.reshape(x.shape[1:]) for s in shards]
      return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, copies)

    return jax.tree.map(canonical, state)

  def put_batch(self, local_batch: dict):
    """This process's part of the global batch -> the mapping's input layout."""
    n = len(self.local_devices)
    for key, value in local_batch.items():
      if value.shape[0] % n:
        raise ValueError(
            f"batch[{key!r}] has {value.shape[0]} rows per process, not divisible "
            f"by the {n} local devices; adjust input.batch_size"
        )
    if self.kind == "pmap":
      return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in local_batch.items()}
    return {
        k: jax.make_array_from_process_local_data(self.sharded, v) for k, v in local_batch.items()
    }

  def prefetch(self, iterator, depth: int = 2) -> "DevicePrefetch":
    """``iterator``'s batches placed on the devices ``depth`` batches ahead (see
    :class:`DevicePrefetch`)."""
    return DevicePrefetch(iterator, self.put_batch, depth)

  def get_metrics(self, metrics):
    """Replicated device metrics -> a dict of host floats."""
    if self.kind == "pmap":
      metrics = jax.tree.map(lambda x: x.addressable_data(0)[0] if x.ndim else x, metrics)
    return {k: float(np.asarray(jax.device_get(v)).reshape(-1)[0]) for k, v in metrics.items()}


class DevicePrefetch(grain.DatasetIterator):
  """Batches of a checkpointable iterator, handed out ``depth`` - 1 batches after their transfer
  to the devices started, so the next batch's copy overlaps the current step.

  Its state (``get_state``, what checkpoints store) is the position after the batches handed
  out, not after those read ahead: a resumed run continues with the first batch this run did not
  train on. ``set_state`` drops what was read ahead.
  """

  def __init__(self, parent: grain.DatasetIterator, put: Callable, depth: int = 2):
    super().__init__(parent)
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._put, self._depth = put, depth
    self._ahead = collections.deque()  # (batch on the devices, parent's state after it)
    self._state = parent.get_state()

  def __next__(self):
    while len(self._ahead) < self._depth:
      try:
        batch = next(self._parent)
      except StopIteration:
        break
      self._ahead.append((self._put(batch), self._parent.get_state()))
    if not self._ahead:
      raise StopIteration
    batch, self._state = self._ahead.popleft()
    return batch

  def get_state(self):
    return copy.deepcopy(self._state)

  def set_state(self, state):
    self._ahead.clear()
    self._parent.set_state(state)
    self._state = self._parent.get_state()


def init_state(
    model, example_batch, tx, *, seed: int, mapping: DeviceMapping, params=None, frozen=None
) -> TrainState:
  """The canonical train state, replicated over all devices.

  Parameters are initialised from ``seed`` unless ``params`` (e.g. pretrained or an earlier
  stage's) are given; ``frozen`` holds parameters the method reads but never updates.
  """

  def init(key, params, frozen):
    init_key, state_key = jax.random.split(key)
    if params is None:
      params = model.init({"params": init_key, "dropout": init_key}, example_batch)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=state_key,
        frozen=frozen if frozen is not None else {},
    )

  return jax.jit(init, out_shardings=mapping.replicated)(jax.random.PRNGKey(seed), params, frozen)
