"""GradCache: the exact gradient of a batch-coupling loss, computed one micro-batch at a time.

A contrastive loss couples every example of the batch with every other, so averaging the gradients
of micro-batches (plain gradient accumulation) gives a different, smaller-batch objective.
GradCache (Gao et al., 2021) keeps the full-batch objective while holding the activations of one
micro-batch only:

  1. embed each micro-batch without keeping activations (no gradient is taken through it);
  2. run the loss on the whole batch's outputs and take its gradient with respect to the outputs;
  3. for each micro-batch, run the forward pass again and back-propagate its slice of those output
     gradients into the parameters, summing over micro-batches.

Step 3 is a ``lax.scan`` whose body holds one micro-batch's forward and backward pass, so peak
activation memory follows the micro-batch, not the batch. Outputs shared by the batch
(``SHARED_OUTPUTS``: the temperature, the prototypes) depend on the parameters alone: their gradient
is back-propagated once. The method's forward must treat each example on its own
(``Method.per_example_forward``) and takes each example's index in the global batch
(``example_index``), so that per-example randomness (dropout) matches the whole-batch step.
"""

import jax
import jax.numpy as jnp

from mmret.losses.common import global_offset
from mmret.models.retrieval import SHARED_OUTPUTS


def check(microbatches, method, method_name: str) -> int:
  """``optim.microbatches`` as an int, checked against the method (1 = GradCache off)."""
  if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(
        f"optim.microbatches must be a positive integer (1 = off), got {microbatches!r}"
    )
  if microbatches > 1 and not method.per_example_forward:
    raise ValueError(
        f"optim.microbatches={microbatches} (GradCache) needs a method whose forward pass treats "
        f"each example on its own; method {method_name!r} couples the examples of a batch in its "
        "forward pass, so micro-batches would change its outputs: use optim.microbatches=1"
    )
  return microbatches


def _split(batch: dict, microbatches: int) -> dict:
  """[B, ...] entries -> [microbatches, B / microbatches, ...]."""
  for key, value in batch.items():
    if value.shape[0] % microbatches:
      raise ValueError(
          f"GradCache: batch[{key!r}] has {value.shape[0]} examples per device, not divisible by "
          f"optim.microbatches={microbatches}; adjust input.batch_size or optim.microbatches"
      )
  return {
      k: v.reshape((microbatches, v.shape[0] // microbatches) + v.shape[1:])
      for k, v in batch.items()
  }


def _differentiable(outputs: dict) -> tuple:
  """(floating outputs, the others: masks, ids)."""
  floating = {k: v for k, v in outputs.items() if jnp.issubdtype(v.dtype, jnp.inexact)}
  return floating, {k: v for k, v in outputs.items() if k not in floating}


def value_and_grad(
    params,
    frozen,
    batch: dict,
    *,
    forward,
    loss_fn,
    microbatches: int,
    rng,
    step,
    axis_name=None,
    frozen_mask=None,
):
  """((loss, metrics), gradient w.r.t. ``params``) of ``loss_fn(forward(params, ...), batch)``.

  Equal to ``jax.value_and_grad`` of the whole-batch objective (see ``step.train_step``), with
  ``batch`` (this device's part of the global batch) run in ``microbatches`` equal parts.
  ``forward`` must accept ``example_index`` (the examples' indices in the global batch).
  """
  local_batch = next(iter(batch.values())).shape[0]
  micro = _split(batch, microbatches)
  size = local_batch // microbatches
  index = (global_offset(local_batch, axis_name) + jnp.arange(local_batch)).reshape(
      microbatches, size
  )

  def run(p, inputs, example_index):
    if frozen_mask is not None:
      p = jax.tree.map(lambda x, fz: jax.lax.stop_gradient(x) if fz else x, p, frozen_mask)
    return forward(
        p, frozen, inputs, rng=rng, step=step, axis_name=axis_name, example_index=example_index
    )

  # 1. Embeddings of every micro-batch, with no gradient (hence no activations) kept.
  constant_params = jax.lax.stop_gradient(params)
  stacked = jax.lax.map(lambda xs: run(constant_params, *xs), (micro, index))
  outputs = {}
  for name, value in stacked.items():
    if name in SHARED_OUTPUTS:
      outputs[name] = value[0]
    elif value.ndim < 2 or value.shape[1] != size:
      raise ValueError(
          f"GradCache: forward output {name!r} of shape {value.shape[1:]} has no leading axis of "
          f"the micro-batch's {size} examples; only {SHARED_OUTPUTS} may be shared by the batch"
      )
    else:
      outputs[name] = value.reshape((local_batch,) + value.shape[2:])

  # 2. The loss on the whole batch, and its gradient with respect to the outputs.
  floating, constants = _differentiable(outputs)

  def loss_of(floating_outputs):
    return loss_fn(dict(constants, **floating_outputs), batch, axis_name=axis_name)

  (loss, metrics), output_grads = jax.value_and_grad(loss_of, has_aux=True)(floating)
  per_example = {
      k: v.reshape((microbatches, size) + v.shape[1:])
      for k, v in output_grads.items()
      if k not in SHARED_OUTPUTS
  }
  shared = {k: v for k, v in output_grads.items() if k in SHARED_OUTPUTS}

  # 3. Each micro-batch's forward again, back-propagating its slice of the output gradients.
  def accumulate(grads, xs):
    i, inputs, example_index, cotangent = xs

    def micro_outputs(p):
      out = run(p, inputs, example_index)
      return {k: out[k] for k in floating}

    _, vjp = jax.vjp(micro_outputs, params)
    # Shared outputs are the same for every micro-batch: their gradient is applied once.
    once = {k: jnp.where(i == 0, v, jnp.zeros_like(v)) for k, v in shared.items()}
    (micro_grads,) = vjp(dict(cotangent, **once))
    return jax.tree.map(jnp.add, grads, micro_grads), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), micro, index, per_example))
  return (loss, metrics), grads
