"""Methods: what a recipe runs around its loss, and the plain contrastive method.

A method supplies the train-time forward pass (e.g. SOLAR fits intersection masks across devices,
then runs the joint encoder under them), the inference-time outputs used for retrieval, and the
frozen parameters it reads (e.g. a distillation teacher). ``config.method.name`` selects one from
``mmret.registry.METHODS``; the other fields of ``config.method`` are its hyper-parameters::

  forward(params, frozen, batch, *, rng, step, axis_name=None) -> outputs   (training)
  predict(params, batch) -> outputs          (retrieval: z_image, z_text, z_joint)

``rng`` is the step's key, the same on every device; randomness that differs between examples
(dropout, SOLAR's views) is drawn from per-example keys folded from each example's index in the
global batch (:func:`example_keys`), so a step gives the same result however the batch is split
over devices. ``axis_name`` names the device axis the batch is split over (None on one device).
"""

import dataclasses
from typing import Any, Callable, Optional

import jax

from mmret.losses.common import global_offset
from mmret.models.retrieval import IMAGE_FEATURES, SHARED_OUTPUTS, TEXT_FEATURES

ForwardFn = Callable[..., dict]
PredictFn = Callable[[Any, dict], dict]
MODEL_INPUTS = (
    ("image", "text_ids", "text_mask")
    + tuple(IMAGE_FEATURES.values())
    + tuple(TEXT_FEATURES.values())
)


def no_frozen(model, params, **hparams):
  del model, params, hparams
  return {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: forward and predict makers, its frozen parameters, and maybe its loss.

  ``make_forward(model, **hparams)`` and ``make_predict(model, **hparams)`` receive every field of
  ``config.method`` but its name; ``init_frozen(model, params, **hparams)`` returns what the state
  keeps frozen. ``loss``: the loss the method trains with (SOLAR's stages, SelfAlign), whose
  hyper-parameters are ``config.loss``; None when ``config.loss.name`` picks a registered loss.
  ``per_example_forward``: each example's training outputs depend on that example alone (and the
  parameters), and the forward takes ``example_index`` ([B] indices of the examples in the global
  batch, for their keys): GradCache (``optim.microbatches`` > 1, ``mmret.gradcache``) may run it
  on micro-batches. False for forwards that couple the batch (SOLAR fits masks across it).
  """

  make_forward: Callable[..., ForwardFn]
  make_predict: Callable[..., PredictFn]
  init_frozen: Callable[..., Any] = no_frozen
  loss: Optional[Callable[..., tuple]] = None
  per_example_forward: bool = False


def batch_size(batch: dict) -> int:
  return next(iter(batch.values())).shape[0]


def model_inputs(batch: dict) -> dict:
  """The entries of ``batch`` the model reads (ground truth and other keys left out)."""
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def example_keys(rng, local_batch: int, *, axis_name=None, index=None):
  """One PRNG key per local example, folded from its index in the global batch: [B, ...].

  ``index`` [B]: the examples' global indices when the local batch is a part of the device's
  batch (a GradCache micro-batch); by default this device's slice of the global batch.
  """
  if index is None:
    index = global_offset(local_batch, axis_name) + jax.numpy.arange(local_batch)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def key_stream(keys, stream: int):
  """Independent per-example keys for one use (``stream``) from :func:`example_keys`' keys."""
  return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def dropout_rate(model) -> float:
  """The largest dropout rate of the retrieval model's towers and joint encoder."""
  return max(float(cfg.get("dropout") or 0.0) for cfg in (model.image, model.text, model.joint))


def apply_model(model, params, *args, train: bool, keys=None, method=None, **kwargs):
  """``model.apply`` on a batch, in which training dropout draws each example's masks from its key.

  ``args`` and ``kwargs`` hold arrays whose leading axis is the batch (or None); ``keys`` [B]
  are per-example keys (:func:`example_keys`). With dropout the model runs on each example alone
  (``jax.vmap``; the encoders couple no examples), so the masks do not depend on how the batch is
  split over devices. Without dropout, or at inference, the batch runs whole and ``keys`` are
  unused. Outputs shared by the batch (``SHARED_OUTPUTS``: the temperature, the prototypes) are
  returned once.
  """
  variables = {"params": params}
  if not (train and dropout_rate(model) > 0):
    return model.apply(variables, *args, train=train, method=method, **kwargs)
  if keys is None:
    raise ValueError("training with dropout needs per-example keys (methods.example_keys)")
  returns_dict = []

  def one(key, inputs):
    example_args, example_kwargs = jax.tree.map(lambda x: x[None], inputs)
    out = model.apply(
        variables, *example_args, train=True, rngs={"dropout": key}, method=method, **example_kwargs
    )
    returns_dict.append(isinstance(out, dict))
    if not isinstance(out, dict):
      return out[0], {}
    shared = {k: v for k, v in out.items() if k in SHARED_OUTPUTS}
    return {k: v[0] for k, v in out.items() if k not in SHARED_OUTPUTS}, shared

  per_example, shared = jax.vmap(one, out_axes=(0, None))(keys, (args, kwargs))
  return dict(per_example, **shared) if returns_dict[0] else per_example


def _contrastive_forward(model, **hparams):
  if hparams:
    raise TypeError(f"the contrastive method takes no hyper-parameters, got {sorted(hparams)}")

  def forward(params, frozen, batch, *, rng, step, axis_name=None, example_index=None):
    del frozen, step
    keys = example_keys(rng, batch_size(batch), axis_name=axis_name, index=example_index)
    return apply_model(model, params, model_inputs(batch), train=True, keys=keys)

  return forward


def _contrastive_predict(model, **hparams):
  del hparams

  def predict(params, batch):
    return model.apply({"params": params}, batch, train=False)

  return predict


# The plain recipe: the model's outputs go straight to the loss named by config.loss.name.
CONTRASTIVE = Method(
    make_forward=_contrastive_forward, make_predict=_contrastive_predict, per_example_forward=True
)
