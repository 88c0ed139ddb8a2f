"""SOLAR's two training stages as methods: forward passes, predict and frozen parameters.

``solar_stage1``: tower pass -> adapted tokens and the unmasked unimodal globals of the joint
encoder fed one modality; the frozen teacher towers' tokens and pooled vectors (the teacher is a
copy of the towers the stage starts from: initial, pretrained or loaded); intersection masks fitted
over all devices (``masks.fit_masks``) and annealed with the step's rho; the joint encoder under
those masks (the masked-ITC embeddings). ``solar_stage2``: the same tower pass of the trained model,
and a frozen *mask model* (a copy of the whole model at the start of stage 2, stage 1's result)
whose scores give the intersection and whose adapted patch features are grouped into segments;
each sample's positive and hard-negative views, embedded by the trained joint encoder. Masks
therefore stay those stage 1 learned while stage 2 trains the joint embedding.

``mask_source``: 'learned' (the masks above), 'random' (the ablation: random masks of the learned
masks' density) or, in stage 2, 'oracle' (a diagnostic: the embedded world's ground-truth
intersection labels, which bounds what better masks could give). Inference is the plain model:
z_image and z_text from the joint encoder fed one modality, z_joint from it fed both.
"""

import functools

import jax
import jax.numpy as jnp

from mmret import methods
from mmret.models.retrieval import RetrievalModel, image_input, text_input
from mmret.recipes.solar import losses, masks as masks_lib, segments, views as views_lib

TOWERS = ("image_tower", "text_tower")
STAGE1_MASK_SOURCES = ("learned", "random")
STAGE2_MASK_SOURCES = ("learned", "random", "oracle")
# Independent per-example random streams (methods.key_stream).
(
    _TOWER_DROPOUT,
    _JOINT_DROPOUT,
    _MASKED_DROPOUT,
    _VIEW_DROPOUT,
    _VIEWS,
    _RANDOM_IMAGE,
    _RANDOM_TEXT,
) = range(7)


def _check_model(model):
  if model.unimodal != "joint" or model.joint_kind != "encoder":
    raise ValueError(
        "SOLAR needs the joint encoder for every embedding: set "
        "model.joint_kind='encoder' and model.unimodal='joint' (got "
        f"joint_kind={model.joint_kind!r}, unimodal={model.unimodal!r})"
    )


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"method.{name} must be one of {choices}, got {value!r}")


def joint_encoder(model, params, *, train, keys=None):
  """The joint encoder as a function of arrays: fn(image_tokens=, text_tokens=, text_mask=,
  image_weights=, text_weights=) -> normalised [B,d] (``keys``: per-example dropout keys)."""
  return functools.partial(
      methods.apply_model, model, params, method=RetrievalModel.encode_joint, train=train, keys=keys
  )


def tower_pass(model, params, batch, *, train, keys=None, with_globals=True):
  """Adapted tokens of both modalities and (``with_globals``) the unmasked unimodal globals of the
  joint encoder fed one modality (``z_image``, ``z_text``)."""
  apply = functools.partial(methods.apply_model, model, params, train=train)
  tower_keys = None if keys is None else methods.key_stream(keys, _TOWER_DROPOUT)
  joint_keys = None if keys is None else methods.key_stream(keys, _JOINT_DROPOUT)
  image = apply(image_input(batch), method=RetrievalModel.encode_image, keys=tower_keys)
  text = apply(
      text_input(batch), batch["text_mask"], method=RetrievalModel.encode_text, keys=tower_keys
  )
  outputs = {
      "image_tokens": image["image_tokens"],
      "text_tokens": text["text_tokens"],
      "text_mask": batch["text_mask"],
  }
  if with_globals:
    encode_joint = joint_encoder(model, params, train=train, keys=joint_keys)
    outputs["z_image"] = encode_joint(image_tokens=image["image_tokens"])
    outputs["z_text"] = encode_joint(text_tokens=text["text_tokens"], text_mask=batch["text_mask"])
  return outputs


def teacher_pass(model, params, teacher, batch):
  """Tokens and pooled vectors of the frozen teacher towers (raw tower outputs, no adapter).

  A batch carrying cached tower outputs (``mmret.feature_cache``, built only when the towers are
  frozen, so the teacher, a copy of the towers the stage starts from, equals them) is read instead
  of a second tower pass.
  """
  image, text = image_input(batch), text_input(batch)
  if isinstance(image, dict) and isinstance(text, dict):
    return {
        "teacher_image_tokens": image["tokens"],
        "teacher_image_global": image["pooled"],
        "teacher_text_tokens": text["tokens"],
        "teacher_text_global": text["pooled"],
    }
  merged = dict(params, **jax.lax.stop_gradient(teacher))
  image = model.apply(
      {"params": merged},
      batch["image"],
      train=False,
      method=lambda m, x, train: m.image_tower(x, train=train),
  )
  text = model.apply(
      {"params": merged},
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


def fit_intersection(
    tower_outputs, keys, *, mask_source, min_variance, axis_name, threshold, score
):
  """``masks.fit_masks`` on a tower pass (tokens and unimodal globals), or with ``mask_source``
  'random' the ablation's masks: random, of the same density per sample (``keys``: per example)."""
  intersection = masks_lib.fit_masks(
      *(
          tower_outputs[k]
          for k in ("image_tokens", "text_tokens", "text_mask", "z_image", "z_text")
      ),
      axis_name=axis_name,
      min_variance=min_variance,
      threshold=threshold,
      score=score,
  )
  if mask_source != "random":
    return intersection
  return masks_lib.randomize_masks(
      intersection,
      methods.key_stream(keys, _RANDOM_IMAGE),
      methods.key_stream(keys, _RANDOM_TEXT),
      tower_outputs["text_mask"],
  )


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


def masked_itc_embeddings(image_tokens, text_tokens, text_mask, intersection, rho, encode_joint):
  """f_V and f_L: the joint encoder reads one modality under its annealed intersection mask.

  ``intersection``: ``fit_masks``' output (its ``{image,text}_intersection_mask``); ``rho`` the
  annealing factor (``M = rho + (1 - rho) M_hat``); ``encode_joint`` as :func:`joint_encoder`.
  """
  image_weights = masks_lib.annealed_mask(intersection["image_intersection_mask"], rho)
  text_weights = masks_lib.annealed_mask(intersection["text_intersection_mask"], rho, text_mask)
  return {
      "masked_z_image": encode_joint(image_tokens=image_tokens, image_weights=image_weights),
      "masked_z_text": encode_joint(
          text_tokens=text_tokens, text_mask=text_mask, text_weights=text_weights
      ),
  }


def make_stage1_forward(
    model,
    *,
    anneal_steps=100,
    anneal_schedule="linear",
    anneal_start=0,
    mask_source="learned",
    min_variance=1e-6,
    threshold="pairs",
    score="cosine",
):
  """Stage-1 forward; ``anneal_start``/``anneal_steps``/``anneal_schedule``: rho stays 1 (the
  masked ITC sees every unit) up to ``anneal_start``, then goes 1 -> 0 (``anneal_rho``);
  ``threshold`` and ``score``: the estimator and token score of ``masks.fit_masks``."""
  _check_model(model)
  _check_choice("mask_source", mask_source, STAGE1_MASK_SOURCES)
  _check_choice("threshold", threshold, masks_lib.THRESHOLDS)
  _check_choice("score", score, masks_lib.SCORES)
  # Validates the schedule name and the start.
  masks_lib.anneal_rho(0, anneal_steps, schedule=anneal_schedule, start=anneal_start)

  def forward(params, frozen, batch, *, rng, step, axis_name=None):
    keys = methods.example_keys(rng, methods.batch_size(batch), axis_name=axis_name)
    outputs = tower_pass(model, params, batch, train=True, keys=keys)
    outputs.update(teacher_pass(model, params, frozen, batch))
    text_mask = outputs["text_mask"]
    intersection = fit_intersection(
        outputs,
        keys,
        mask_source=mask_source,
        min_variance=min_variance,
        axis_name=axis_name,
        threshold=threshold,
        score=score,
    )
    rho = masks_lib.anneal_rho(step, anneal_steps, schedule=anneal_schedule, start=anneal_start)
    encode_joint = joint_encoder(
        model, params, train=True, keys=methods.key_stream(keys, _MASKED_DROPOUT)
    )
    outputs.update(
        masked_itc_embeddings(
            outputs["image_tokens"],
            outputs["text_tokens"],
            text_mask,
            intersection,
            rho,
            encode_joint,
        )
    )
    outputs.update(
        intersection, rho=rho, logit_scale=jnp.minimum(params["logit_scale"], model.max_logit_scale)
    )
    return outputs

  return forward


def stage1_teacher(model, params, **hparams):
  """The distillation teacher: a copy of the towers the stage starts from."""
  del model, hparams
  missing = [name for name in TOWERS if name not in params]
  if missing:
    raise KeyError(f"parameters have no {missing} (top-level: {sorted(params)})")
  return _copy({name: params[name] for name in TOWERS})


STAGE1 = methods.Method(
    make_forward=make_stage1_forward,
    make_predict=_predict,
    init_frozen=stage1_teacher,
    loss=losses.stage1_loss,
)


# --------------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------------


def view_embeddings(views, image_tokens, text_tokens, text_mask, encode_joint):
  """Each sample's original, positive and hard-negative views, embedded by the joint encoder.

  ``views``: ``views.stage2_views``' keep masks. The three views run through ``encode_joint`` in
  one pass, stacked along the batch (original rows first, then the positive views, then the
  negative views). Returns ``views`` with ``z_anchor``, ``z_positive``, ``z_negative`` [B,d].
  """
  batch = image_tokens.shape[0]
  stack = lambda x: jnp.concatenate([x, x, x])
  all_patches = jnp.ones(image_tokens.shape[:2], bool)
  image_weights = jnp.concatenate(
      [all_patches, views["image_positive_keep"], views["image_negative_keep"]]
  ).astype(jnp.float32)
  text_weights = jnp.concatenate(
      [text_mask, views["text_positive_keep"], views["text_negative_keep"]]
  ).astype(jnp.float32)
  joint = encode_joint(
      image_tokens=stack(image_tokens),
      text_tokens=stack(text_tokens),
      text_mask=stack(text_mask),
      image_weights=image_weights,
      text_weights=text_weights,
  )
  return dict(
      views,
      z_anchor=joint[:batch],
      z_positive=joint[batch : 2 * batch],
      z_negative=joint[2 * batch :],
  )


def oracle_intersection(batch, num_patches, *, patch_label_fraction):
  """Ground-truth intersection units of the embedded world, as ``fit_masks``-shaped masks."""
  missing = sorted({"text_intersection", "image_labels"} - set(batch))
  if missing:
    raise ValueError(
        f"mask_source='oracle' needs the ground-truth batch keys {missing} (the "
        "embedded world's training split carries them)"
    )
  patches = masks_lib.patch_labels(
      batch["image_labels"], masks_lib.patch_grid(num_patches), min_fraction=patch_label_fraction
  )
  text = (batch["text_intersection"] == masks_lib.INTERSECTION_LABEL) & batch["text_mask"]
  return {"image_intersection_mask": patches, "text_intersection_mask": text}


def make_stage2_forward(
    model,
    *,
    num_segments=4,
    segment_iterations=5,
    segment_position_weight=1.0,
    mask_source="learned",
    min_variance=1e-6,
    view_mode="random",
    mask_ratio=0.3,
    negative_ratio=1.0,
    text_negative="ratio",
    image_negative="ratio",
    threshold="pairs",
    score="cosine",
    segment_method="kmeans",
    patch_label_fraction=0.25,
):
  """Stage-2 forward: trained tower pass, frozen mask-model pass, patch segments and views.

  Patches are grouped per image into ``num_segments`` segments by k-means on the mask model's
  adapted patch features plus grid position (``segments.patch_segments``); a segment belongs to
  the intersection when its mean patch score exceeds the image threshold. ``view_mode``: which
  modality each sample masks ('both', 'text', 'image', 'random'); ``mask_ratio`` of the
  intersection units are dropped for the positive and ``negative_ratio`` of the difference units
  for the hard negative (``views.masked_views``), or with ``text_negative`` / ``image_negative``
  'fact' one phrase / one segment of the difference (``views.stage2_views``). ``threshold`` and
  ``score``: the estimator and token score of ``masks.fit_masks``; ``segment_method``: 'kmeans' or 'agglomerative'
  (``segments.patch_segments``).
  """
  _check_model(model)
  _check_choice("mask_source", mask_source, STAGE2_MASK_SOURCES)
  _check_choice("view_mode", view_mode, views_lib.VIEW_MODES)
  _check_choice("threshold", threshold, masks_lib.THRESHOLDS)
  _check_choice("score", score, masks_lib.SCORES)
  _check_choice("text_negative", text_negative, views_lib.NEGATIVES)
  _check_choice("image_negative", image_negative, views_lib.NEGATIVES)
  _check_choice("segment_method", segment_method, segments.METHODS)

  def forward(params, frozen, batch, *, rng, step, axis_name=None):
    del step
    keys = methods.example_keys(rng, methods.batch_size(batch), axis_name=axis_name)
    trained = tower_pass(model, params, batch, train=True, keys=keys, with_globals=False)
    mask_model = tower_pass(model, jax.lax.stop_gradient(frozen), batch, train=False)
    image_tokens, text_mask = mask_model["image_tokens"], batch["text_mask"]
    intersection = fit_intersection(
        mask_model,
        keys,
        mask_source=mask_source,
        min_variance=min_variance,
        axis_name=axis_name,
        threshold=threshold,
        score=score,
    )
    if mask_source == "oracle":
      intersection.update(
          oracle_intersection(
              batch, image_tokens.shape[1], patch_label_fraction=patch_label_fraction
          )
      )
    if mask_source == "learned":
      patch_scores, image_threshold = intersection["image_scores"], intersection["image_threshold"]
    else:  # segments are the intersection when most of their patches are
      patch_scores = intersection["image_intersection_mask"].astype(jnp.float32)
      image_threshold = jnp.float32(0.5)
    segment_ids = segments.patch_segments(
        image_tokens,
        masks_lib.patch_grid(image_tokens.shape[1]),
        num_segments,
        iterations=segment_iterations,
        position_weight=segment_position_weight,
        method=segment_method,
    )
    # The joint encoder's dropout keys for the stacked views: one stream per view.
    dropout_keys = methods.key_stream(keys, _VIEW_DROPOUT)
    stacked_keys = jnp.concatenate([methods.key_stream(dropout_keys, i) for i in range(3)])
    views = views_lib.stage2_views(
        methods.key_stream(keys, _VIEWS),
        intersection["text_intersection_mask"],
        text_mask,
        patch_scores,
        image_threshold,
        segment_ids,
        num_segments,
        mode=view_mode,
        mask_ratio=mask_ratio,
        negative_ratio=negative_ratio,
        text_negative=text_negative,
        image_negative=image_negative,
    )
    encode_joint = joint_encoder(model, params, train=True, keys=stacked_keys)
    outputs = view_embeddings(
        views, trained["image_tokens"], trained["text_tokens"], text_mask, encode_joint
    )
    outputs.update(
        text_mask=text_mask,
        segment_ids=segment_ids,
        image_threshold=intersection["image_threshold"],
        text_threshold=intersection["text_threshold"],
    )
    return outputs

  return forward


def stage2_mask_model(model, params, **hparams):
  """The frozen mask model: a copy of every parameter the stage starts from (stage 1's result)."""
  del model, hparams
  return _copy(params)


STAGE2 = methods.Method(
    make_forward=make_stage2_forward,
    make_predict=_predict,
    init_frozen=stage2_mask_model,
    loss=losses.stage2_loss,
)
