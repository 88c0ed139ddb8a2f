"""SOLAR's two stage losses, composed from the pure functions of ``mmret.methods.solar``.

Both read what the SOLAR methods' forward passes return (``mmret.methods.solar_recipe``):
  image_tokens [B,P,d], text_tokens [B,L,d], text_mask [B,L]   adapted tokens of the trained model
  encode_joint   fn(image_tokens=, text_tokens=, text_mask=, image_weights=, text_weights=)
                 -> [B,d]:
                 the trained joint encoder, so that the loss can run it under masks it computes
                 from statistics gathered across devices
Stage 1 also reads z_image, z_text [B,d] (unmasked unimodal globals), teacher_{image,text}_tokens,
teacher_{image,text}_global (the frozen teacher towers), rho (mask annealing) and logit_scale;
stage 2 reads mask_{image,text}_tokens, mask_z_{image,text} (the frozen mask model), segment_ids
[B,P] with their (static) num_segments, and view_rng. Either reads ``random_mask_rng`` when
present: the random-mask ablation.

Mask quality against the embedded world's ground truth is measured whenever the batch carries it
(``text_intersection`` [B,L]: 1 on intersection tokens; ``image_labels`` [B,H,W]: 1 on intersection
object pixels); see :func:`patch_labels` for how a patch is labelled.
"""

import math

import jax
import jax.numpy as jnp

from mmret.losses import register
from mmret.losses.contrastive import clip_loss
from mmret.methods import solar

INTERSECTION_LABEL = 1  # value of intersection tokens / object pixels in the ground truth


# --------------------------------------------------------------------------------------------------
# Helpers: patch ground truth, mask quality, random masks
# --------------------------------------------------------------------------------------------------


def patch_grid(num_patches: int) -> tuple[int, int]:
  """(rows, cols) of a square patch grid holding ``num_patches``."""
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(f"{num_patches} patches do not form a square grid")
  return side, side


def patch_labels(image_labels, grid_shape, *, min_fraction=0.25):
  """Per-patch intersection truth [B,P] from pixel labels [B,H,W].

  A patch is labelled intersection when at least ``min_fraction`` of its pixels belong to an
  intersection object (label 1). A plain majority (0.5) marks very few patches on the small
  embedded-world images, whose objects rarely cover half a patch.
  """
  batch, height, width = image_labels.shape
  rows, cols = grid_shape
  if height % rows or width % cols:
    raise ValueError(
        f"image_labels of size {height}x{width} do not split into a {rows}x{cols} " "patch grid"
    )
  pixels = (image_labels == INTERSECTION_LABEL).astype(jnp.float32)
  pixels = pixels.reshape(batch, rows, height // rows, cols, width // cols)
  fraction = pixels.mean(axis=(2, 4)).reshape(batch, rows * cols)
  return fraction >= min_fraction


def mask_quality(predicted, truth, valid=None, *, axis_name=None):
  """IoU, precision and recall of a predicted binary mask against the truth, over all devices.

  Counts are summed over every valid entry of the global batch (micro average) and returned as
  fractions in [0, 1]; an empty denominator gives 0. The values are the same on every device.
  """
  predicted, truth = predicted.astype(bool), truth.astype(bool)
  if valid is not None:
    predicted, truth = predicted & valid, truth & valid
  counts = jnp.stack(
      [jnp.sum(predicted & truth), jnp.sum(predicted), jnp.sum(truth), jnp.sum(predicted | truth)]
  ).astype(jnp.float32)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  hit, n_predicted, n_true, n_union = counts
  ratio = lambda a, b: jnp.where(b > 0, a / jnp.maximum(b, 1.0), 0.0)
  return {
      "iou": ratio(hit, n_union),
      "precision": ratio(hit, n_predicted),
      "recall": ratio(hit, n_true),
  }


def random_mask_like(rng, mask, valid):
  """A random mask with the same number of selected entries per row as ``mask`` [B,U], among the
  ``valid`` ones: the random-mask ablation keeps each sample's mask density."""
  count = jnp.sum(mask > 0.5, axis=-1)
  noise = jax.random.uniform(rng, mask.shape)
  noise = jnp.where(valid, noise, 2.0)  # invalid entries rank last
  rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return ((rank < count[:, None]) & valid).astype(jnp.float32)


def _global_mean(values, valid, axis_name):
  """Mean over the valid entries of the global batch, the same value on every device."""
  sums = jnp.stack([jnp.sum(values * valid), jnp.sum(valid)]).astype(jnp.float32)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums[0] / jnp.maximum(sums[1], 1.0)


def _quality_metrics(prefix, predicted, truth, valid, axis_name):
  return {
      f"{prefix}_{k}": v
      for k, v in mask_quality(predicted, truth, valid, axis_name=axis_name).items()
  }


def _check_keys(outputs, keys, loss_name):
  missing = [k for k in keys if k not in outputs]
  if missing:
    raise KeyError(
        f"loss {loss_name!r} needs outputs {missing} (got {sorted(outputs)}); "
        f"train it with the method of the same name"
    )


# --------------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------------

STAGE1_KEYS = (
    "image_tokens",
    "text_tokens",
    "text_mask",
    "z_image",
    "z_text",
    "encode_joint",
    "teacher_image_tokens",
    "teacher_text_tokens",
    "teacher_image_global",
    "teacher_text_global",
    "rho",
    "logit_scale",
)


def stage1_masks(outputs, *, axis_name=None, min_variance=1e-6):
  """Hard intersection masks, their scores and thresholds from the stage-1 outputs.

  Token scores are cosines to the partner's unmasked global (patches vs z_text, words vs
  z_image); each modality's threshold is the density crossing of its positive-pair and
  in-batch-negative scores over all devices. Returns a dict of [B,P]/[B,L] masks and scores and
  the two scalar thresholds (no gradient through any of them).
  """
  image_tokens, text_tokens = outputs["image_tokens"], outputs["text_tokens"]
  text_mask = outputs["text_mask"]
  z_image = jax.lax.stop_gradient(outputs["z_image"])
  z_text = jax.lax.stop_gradient(outputs["z_text"])
  image_tokens_sg = jax.lax.stop_gradient(image_tokens)
  text_tokens_sg = jax.lax.stop_gradient(text_tokens)
  patch_valid = jnp.ones(image_tokens.shape[:2], bool)
  image_threshold = solar.intersection_threshold(
      image_tokens_sg, patch_valid, z_text, axis_name=axis_name, min_variance=min_variance
  )
  text_threshold = solar.intersection_threshold(
      text_tokens_sg, text_mask, z_image, axis_name=axis_name, min_variance=min_variance
  )
  image_scores = solar.token_scores(image_tokens_sg, z_text)
  text_scores = solar.token_scores(text_tokens_sg, z_image)
  image_mask = solar.intersection_mask(image_scores, image_threshold)
  text_mask_hat = solar.intersection_mask(text_scores, text_threshold, text_mask)
  if "random_mask_rng" in outputs:
    image_rng, text_rng = jax.random.split(outputs["random_mask_rng"])
    image_mask = random_mask_like(image_rng, image_mask, patch_valid)
    text_mask_hat = random_mask_like(text_rng, text_mask_hat, text_mask)
  return {
      "image_mask": image_mask,
      "text_mask": text_mask_hat,
      "image_scores": image_scores,
      "text_scores": text_scores,
      "image_threshold": image_threshold,
      "text_threshold": text_threshold,
  }


@register("solar_stage1")
def solar_stage1_loss(
    outputs,
    batch,
    *,
    axis_name=None,
    itc_weight=1.0,
    gla_weight=1.0,
    ld_weight=0.1,
    gd_weight=0.1,
    gla_margin=0.2,
    temperature=None,
    min_variance=1e-6,
    patch_label_fraction=0.25,
):
  """Stage 1: masked ITC + GLA + local and global Pearson distillation, weighted and summed.

  - masked ITC: the joint encoder reads the image tokens alone under the annealed image mask
    ``M = rho + (1 - rho) M_hat`` (giving f_V) and the text tokens alone under the text mask
    (f_L); f_V and f_L are aligned by bidirectional InfoNCE (``temperature`` fixed, or the model's
    learnable one when None).
  - GLA (margin ``gla_margin``), both directions, negatives from all devices.
  - LD: within-sample token-token cosines of the adapted tokens vs the teacher towers' tokens,
    both modalities averaged. GD: rows of the in-batch image-image and text-text similarity of
    the unmasked globals vs the teacher's pooled vectors (within-modality matrices: a teacher that
    is not cross-modally aligned still defines them).
  """
  _check_keys(outputs, STAGE1_KEYS, "solar_stage1")
  image_tokens, text_tokens = outputs["image_tokens"], outputs["text_tokens"]
  text_mask = outputs["text_mask"]
  z_image, z_text = outputs["z_image"], outputs["z_text"]
  masks = stage1_masks(outputs, axis_name=axis_name, min_variance=min_variance)
  rho = outputs["rho"]
  image_weights = solar.annealed_mask(masks["image_mask"], rho)
  text_weights = solar.annealed_mask(masks["text_mask"], rho, text_mask)
  encode_joint = outputs["encode_joint"]
  f_image = encode_joint(image_tokens=image_tokens, image_weights=image_weights)
  f_text = encode_joint(text_tokens=text_tokens, text_mask=text_mask, text_weights=text_weights)
  itc, itc_metrics = clip_loss(
      {"z_image": f_image, "z_text": f_text, "logit_scale": outputs["logit_scale"]},
      batch,
      axis_name=axis_name,
      temperature=temperature,
  )
  gla = solar.gla_loss(
      image_tokens, text_tokens, text_mask, z_image, z_text, margin=gla_margin, axis_name=axis_name
  )
  patch_valid = jnp.ones(image_tokens.shape[:2], bool)
  ld = 0.5 * (
      solar.local_distillation(
          outputs["teacher_image_tokens"], image_tokens, patch_valid, axis_name=axis_name
      )
      + solar.local_distillation(
          outputs["teacher_text_tokens"], text_tokens, text_mask, axis_name=axis_name
      )
  )
  t_image, t_text = outputs["teacher_image_global"], outputs["teacher_text_global"]
  gd = 0.5 * (
      solar.global_distillation(t_image, t_image, z_image, z_image, axis_name=axis_name)
      + solar.global_distillation(t_text, t_text, z_text, z_text, axis_name=axis_name)
  )
  loss = itc_weight * itc + gla_weight * gla + ld_weight * ld + gd_weight * gd

  metrics = {
      "loss_itc": itc,
      "loss_gla": gla,
      "loss_ld": ld,
      "loss_gd": gd,
      "acc_itc": itc_metrics["acc_i2t"],
      "scale": itc_metrics["scale"],
      "rho": rho,
      "image_threshold": masks["image_threshold"],
      "text_threshold": masks["text_threshold"],
      "image_mask_fraction": _global_mean(masks["image_mask"], patch_valid, axis_name),
      "text_mask_fraction": _global_mean(masks["text_mask"], text_mask, axis_name),
  }
  if "text_intersection" in batch:
    truth = batch["text_intersection"] == INTERSECTION_LABEL
    metrics.update(_quality_metrics("text_mask", masks["text_mask"], truth, text_mask, axis_name))
  if "image_labels" in batch:
    truth = patch_labels(
        batch["image_labels"], patch_grid(image_tokens.shape[1]), min_fraction=patch_label_fraction
    )
    metrics.update(
        _quality_metrics("patch_mask", masks["image_mask"], truth, patch_valid, axis_name)
    )
  return loss, metrics


# --------------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------------

STAGE2_KEYS = (
    "image_tokens",
    "text_tokens",
    "text_mask",
    "encode_joint",
    "mask_image_tokens",
    "mask_text_tokens",
    "mask_z_image",
    "mask_z_text",
    "segment_ids",
    "num_segments",
    "view_rng",
)


@register("solar_stage2")
def solar_stage2_loss(
    outputs,
    batch,
    *,
    axis_name=None,
    temperature=0.05,
    symmetric=True,
    view_mode="random",
    mask_ratio=0.3,
    negative_ratio=1.0,
    min_variance=1e-6,
    oracle_masks=False,
    patch_label_fraction=0.25,
):
  """Stage 2: multi-positive InfoNCE over joint embeddings of original, positive and negative views.

  The frozen mask model's tokens are scored against its partner globals; a threshold per modality
  is fitted across devices as in stage 1. Text tokens above it are the intersection; image patches
  are grouped into the ``segment_ids`` segments scored by mean patch score. ``stage2_views`` masks
  ``mask_ratio`` of the intersection units for a positive and ``negative_ratio`` of the difference
  for a hard negative (``view_mode``: which modality each sample masks). The trained joint encoder
  embeds the three views of each sample from the trained model's tokens; negatives are the
  constructed hard negatives and every other sample's views (all devices).

  ``oracle_masks`` (a diagnostic, embedded world only): the views are built from the batch's
  ground-truth intersection labels (``text_intersection``; ``image_labels`` turned into patch labels
  with ``patch_label_fraction``) instead of the mask model's scores, which bounds what better masks
  could give.
  """
  _check_keys(outputs, STAGE2_KEYS, "solar_stage2")
  if oracle_masks and "random_mask_rng" in outputs:
    raise ValueError("solar_stage2: oracle_masks and random masks exclude each other")
  text_mask = outputs["text_mask"]
  mask_image, mask_text = outputs["mask_image_tokens"], outputs["mask_text_tokens"]
  mask_z_image, mask_z_text = outputs["mask_z_image"], outputs["mask_z_text"]
  patch_valid = jnp.ones(mask_image.shape[:2], bool)
  image_threshold = solar.intersection_threshold(
      mask_image, patch_valid, mask_z_text, axis_name=axis_name, min_variance=min_variance
  )
  text_threshold = solar.intersection_threshold(
      mask_text, text_mask, mask_z_image, axis_name=axis_name, min_variance=min_variance
  )
  image_scores = jax.lax.stop_gradient(solar.token_scores(mask_image, mask_z_text))
  text_scores = jax.lax.stop_gradient(solar.token_scores(mask_text, mask_z_image))
  if "random_mask_rng" in outputs:
    # Same density, random place: the masks become the scores, thresholded at one half.
    image_rng, text_rng = jax.random.split(outputs["random_mask_rng"])
    image_scores = random_mask_like(
        image_rng, solar.intersection_mask(image_scores, image_threshold), patch_valid
    )
    text_scores = random_mask_like(
        text_rng, solar.intersection_mask(text_scores, text_threshold, text_mask), text_mask
    )
    image_threshold = text_threshold = jnp.float32(0.5)
  if oracle_masks:
    missing = sorted({"text_intersection", "image_labels"} - set(batch))
    if missing:
      raise ValueError(
          f"solar_stage2: oracle_masks needs the ground-truth batch keys {missing} "
          "(the embedded world's training split carries them)"
      )
    image_scores = patch_labels(
        batch["image_labels"], patch_grid(mask_image.shape[1]), min_fraction=patch_label_fraction
    ).astype(jnp.float32)
    text_scores = (batch["text_intersection"] == INTERSECTION_LABEL).astype(jnp.float32)
    image_threshold = text_threshold = jnp.float32(0.5)
  views = solar.stage2_views(
      outputs["view_rng"],
      text_scores,
      text_threshold,
      text_mask,
      image_scores,
      image_threshold,
      outputs["segment_ids"],
      outputs["num_segments"],
      mode=view_mode,
      mask_ratio=mask_ratio,
      negative_ratio=negative_ratio,
      axis_name=axis_name,
  )
  image_tokens, text_tokens = outputs["image_tokens"], outputs["text_tokens"]
  batch_size = image_tokens.shape[0]
  # One joint pass over the three views stacked along the batch.
  stack = lambda x: jnp.concatenate([x, x, x])
  image_weights = jnp.concatenate(
      [patch_valid, views["image_positive_keep"], views["image_negative_keep"]]
  ).astype(jnp.float32)
  text_weights = jnp.concatenate(
      [text_mask, views["text_positive_keep"], views["text_negative_keep"]]
  ).astype(jnp.float32)
  joint = outputs["encode_joint"](
      image_tokens=stack(image_tokens),
      text_tokens=stack(text_tokens),
      text_mask=stack(text_mask),
      image_weights=image_weights,
      text_weights=text_weights,
  )
  f_anchor, f_positive, f_negative = (
      joint[i * batch_size : (i + 1) * batch_size] for i in range(3)
  )
  loss = solar.stage2_contrastive_loss(
      f_anchor,
      f_positive,
      f_negative,
      views["has_positive"],
      views["has_negative"],
      temperature=temperature,
      symmetric=symmetric,
      axis_name=axis_name,
  )
  ones = jnp.ones((batch_size,), jnp.float32)
  positive_similarity = jnp.sum(f_anchor * f_positive, -1)
  negative_similarity = jnp.sum(f_anchor * f_negative, -1)
  has_negative = views["has_negative"].astype(jnp.float32)
  metrics = {
      "image_threshold": image_threshold,
      "text_threshold": text_threshold,
      "has_positive": _global_mean(views["has_positive"].astype(jnp.float32), ones, axis_name),
      "has_negative": _global_mean(has_negative, ones, axis_name),
      "sim_positive": _global_mean(positive_similarity, ones, axis_name),
      "sim_negative": _global_mean(negative_similarity, has_negative, axis_name),
      "text_positive_kept": _global_mean(
          views["text_positive_keep"].astype(jnp.float32), text_mask, axis_name
      ),
      "image_positive_kept": _global_mean(
          views["image_positive_keep"].astype(jnp.float32), patch_valid, axis_name
      ),
  }
  return loss, metrics
