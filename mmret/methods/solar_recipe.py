"""SOLAR's two training stages as methods (forward passes, predict, frozen parameters).

``solar_stage1``: tower pass -> adapted tokens; unmasked unimodal globals from the joint encoder fed
one modality; the frozen teacher towers' tokens and pooled vectors (the teacher is a copy of the
towers the stage starts from: initial, pretrained or loaded); the mask annealing factor rho of the
step. ``solar_stage2``: the same tower pass of the trained model plus a frozen *mask model*, a copy
of the whole model at the start of stage 2 (stage 1's result), whose tokens and globals give the
intersection scores and whose adapted patch features are grouped into segments. Masks therefore
stay those stage 1 learned while stage 2 trains the joint embedding.

Both hand the loss (``mmret.losses.solar``) the trained joint encoder as ``encode_joint``: the
masks depend on thresholds fitted over all devices, which only the loss (given ``axis_name``) can
compute. ``random_masks=True`` is the ablation replacing learned masks by random ones of the same
density (the loss draws them from ``random_mask_rng``). Inference is the plain model: z_image and
z_text from the joint encoder fed one modality, z_joint from it fed both.
"""

import functools

import jax
import jax.numpy as jnp

from mmret.losses import solar as solar_losses
from mmret.methods import Method, register
from mmret.methods import solar
from mmret.models.retrieval import RetrievalModel

TOWERS = ("image_tower", "text_tower")
# Independent random streams folded from the step's key.
_DROPOUT, _VIEWS, _RANDOM_MASKS = 0, 1, 2


def _check_model(model):
  if model.unimodal != "joint" or model.joint_kind != "encoder":
    raise ValueError(
        "SOLAR needs the joint encoder for every embedding: set "
        "model.joint_kind='encoder' and model.unimodal='joint' (got "
        f"joint_kind={model.joint_kind!r}, unimodal={model.unimodal!r})"
    )


def _apply(model, params, *args, method, train, rng=None, **kwargs):
  rngs = {"dropout": rng} if rng is not None else None
  return model.apply({"params": params}, *args, train=train, rngs=rngs, method=method, **kwargs)


def tower_pass(model, params, batch, *, train, rng=None):
  """Adapted tokens of both modalities and the unmasked unimodal globals of the joint encoder."""
  image = _apply(
      model, params, batch["image"], method=RetrievalModel.encode_image, train=train, rng=rng
  )
  text = _apply(
      model,
      params,
      batch["text_ids"],
      batch["text_mask"],
      method=RetrievalModel.encode_text,
      train=train,
      rng=rng,
  )
  encode_joint = functools.partial(
      _apply, model, params, method=RetrievalModel.encode_joint, train=train, rng=rng
  )
  return {
      "image_tokens": image["image_tokens"],
      "text_tokens": text["text_tokens"],
      "text_mask": batch["text_mask"],
      "z_image": encode_joint(image["image_tokens"]),
      "z_text": encode_joint(text_tokens=text["text_tokens"], text_mask=batch["text_mask"]),
      "encode_joint": encode_joint,
  }


def teacher_pass(model, params, teacher, batch):
  """Tokens and pooled vectors of the frozen teacher towers (raw tower outputs, no adapter)."""
  towers = jax.lax.stop_gradient(teacher)
  merged = dict(params, **towers)
  image = _apply(
      model,
      merged,
      batch["image"],
      train=False,
      method=lambda m, x, train: m.image_tower(x, train=train),
  )
  text = _apply(
      model,
      merged,
      batch["text_ids"],
      batch["text_mask"],
      train=False,
      method=lambda m, ids, mask, train: m.text_tower(ids, mask, train=train),
  )
  return {
      "teacher_image_tokens": image["tokens"],
      "teacher_image_global": image["pooled"],
      "teacher_text_tokens": text["tokens"],
      "teacher_text_global": text["pooled"],
  }


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _predict(model, **hparams):
  del hparams
  _check_model(model)

  def predict(params, batch):
    return model.apply({"params": params}, batch, train=False)

  return predict


# --------------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------------


def make_stage1_forward(model, *, anneal_steps=100, anneal_schedule="linear", random_masks=False):
  """Stage-1 forward; ``anneal_steps``/``anneal_schedule``: rho goes 1 -> 0 (see ``anneal_rho``)."""
  _check_model(model)
  solar.anneal_rho(0, anneal_steps, schedule=anneal_schedule)  # validates the schedule name

  def forward(params, frozen, batch, *, rng, step):
    outputs = tower_pass(model, params, batch, train=True, rng=jax.random.fold_in(rng, _DROPOUT))
    outputs.update(teacher_pass(model, params, frozen, batch))
    outputs["logit_scale"] = jnp.minimum(params["logit_scale"], model.max_logit_scale)
    outputs["rho"] = solar.anneal_rho(step, anneal_steps, schedule=anneal_schedule)
    if random_masks:
      outputs["random_mask_rng"] = jax.random.fold_in(rng, _RANDOM_MASKS)
    return outputs

  return forward


def stage1_teacher(model, params, **hparams):
  """The distillation teacher: a copy of the towers the stage starts from."""
  del model, hparams
  missing = [name for name in TOWERS if name not in params]
  if missing:
    raise KeyError(f"parameters have no {missing} (top-level: {sorted(params)})")
  return _copy({name: params[name] for name in TOWERS})


SOLAR_STAGE1 = register(
    "solar_stage1",
    Method(make_forward=make_stage1_forward, make_predict=_predict, init_frozen=stage1_teacher),
)


# --------------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------------


def make_stage2_forward(
    model, *, num_segments=4, segment_iterations=5, segment_position_weight=1.0, random_masks=False
):
  """Stage-2 forward: trained tower pass, frozen mask-model pass and patch segments.

  Patches are grouped per image into ``num_segments`` segments by k-means on the mask model's
  adapted patch features plus grid position (``solar.patch_segments``).
  """
  _check_model(model)

  def forward(params, frozen, batch, *, rng, step):
    del step
    outputs = tower_pass(model, params, batch, train=True, rng=jax.random.fold_in(rng, _DROPOUT))
    del outputs["z_image"], outputs["z_text"]  # only the mask model's globals are used
    mask_model = tower_pass(model, jax.lax.stop_gradient(frozen), batch, train=False)
    image_tokens = mask_model["image_tokens"]
    grid = solar_losses.patch_grid(image_tokens.shape[1])
    outputs.update(
        mask_image_tokens=image_tokens,
        mask_text_tokens=mask_model["text_tokens"],
        mask_z_image=mask_model["z_image"],
        mask_z_text=mask_model["z_text"],
        segment_ids=solar.patch_segments(
            image_tokens,
            grid,
            num_segments,
            iterations=segment_iterations,
            position_weight=segment_position_weight,
        ),
        num_segments=num_segments,
        view_rng=jax.random.fold_in(rng, _VIEWS),
    )
    if random_masks:
      outputs["random_mask_rng"] = jax.random.fold_in(rng, _RANDOM_MASKS)
    return outputs

  return forward


def stage2_mask_model(model, params, **hparams):
  """The frozen mask model: a copy of every parameter the stage starts from (stage 1's result)."""
  del model, hparams
  return _copy(params)


SOLAR_STAGE2 = register(
    "solar_stage2",
    Method(make_forward=make_stage2_forward, make_predict=_predict, init_frozen=stage2_mask_model),
)
