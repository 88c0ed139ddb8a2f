"""SOLAR's losses: stage 1 (masked ITC, global-to-local alignment, local and global correlation
distillation) and stage 2 (multi-positive InfoNCE over the joint embeddings of each sample's views).

The building blocks are pure functions of arrays; :func:`stage1_loss` and :func:`stage2_loss` read
what the stages' forward passes return (``mmret.recipes.solar.method``). Functions taking
``axis_name`` gather the other devices' samples over it and return values whose ``pmean`` over the
devices equals the single-device value on the global batch.
"""

import functools

import jax
import jax.numpy as jnp

from mmret.losses import chunked
from mmret.losses.common import gather, global_mean, local_labels, mean_over_valid
from mmret.losses.contrastive import clip_loss, multi_positive_infonce
from mmret.ops import l2_normalize
from mmret.recipes.solar import masks as masks_lib

# --------------------------------------------------------------------------------------------------
# Stage 1: global-to-local alignment and correlation distillation
# --------------------------------------------------------------------------------------------------


def global_to_local_alignment(tokens, token_mask, partner_global, *, margin=0.2, axis_name=None):
  """One direction of GLA: [mean(S-) + margin - mean(S+)]_+ per sample, averaged over samples.

  S+ are the cosines of the sample's valid tokens to its partner's global vector, S- those of the
  same tokens to the other samples' partner globals (all devices). Samples without a valid token are
  left out; a global batch of one sample has no negatives and gives 0.

  Args:
    tokens: [B,T,d] local features of one modality. token_mask: [B,T] True for real tokens.
    partner_global: [B,d] global embeddings of the other modality.
  """
  tokens = l2_normalize(tokens)
  partners = gather(l2_normalize(partner_global), axis_name)  # [N,d]
  n_global = partners.shape[0]
  similarity = jnp.einsum("btd,nd->btn", tokens, partners)  # [B,T,N]
  own = local_labels(tokens.shape[0], axis_name)
  is_own = jnp.arange(n_global)[None, :] == own[:, None]  # [B,N]
  mask = token_mask.astype(jnp.float32)
  count = jnp.sum(mask, axis=-1)
  per_token_own = jnp.take_along_axis(similarity, own[:, None, None], axis=-1)[..., 0]
  mean_positive = jnp.sum(per_token_own * mask, -1) / jnp.maximum(count, 1.0)
  negative_weight = mask[:, :, None] * (~is_own)[:, None, :]
  mean_negative = jnp.sum(similarity * negative_weight, (1, 2)) / jnp.maximum(
      count * (n_global - 1), 1.0
  )
  hinge = jax.nn.relu(mean_negative + margin - mean_positive)
  if n_global == 1:  # no negative to compare with
    hinge = jnp.zeros_like(hinge)
  return mean_over_valid(hinge, count > 0, axis_name)


def token_to_global_infonce(tokens, token_mask, partner_global, *, temperature=0.1, axis_name=None):
  """Per-token InfoNCE: each valid token picks its own partner's global among all partners.

  loss = mean over the valid tokens (all devices) of -log softmax_n(cos(token, partner_n) / T)
  at the token's own partner. Unlike GLA's hinge on the caption's mean cosine, every token is
  contrasted on its own: a token that tells its partner apart from the others (an intersection
  word, an object's patch) can lower its loss, a template word or a text-only fact cannot, so
  the trained cosines are token scores (``masks.token_score_samples``, ``score='contrast'``).

  Args:
    tokens: [B,T,d] local features of one modality. token_mask: [B,T] True for real tokens.
    partner_global: [B,d] global embeddings of the other modality.
  """
  tokens = l2_normalize(tokens)
  partners = gather(l2_normalize(partner_global), axis_name)  # [N,d]
  logits = jnp.einsum("btd,nd->btn", tokens, partners) / temperature
  own = local_labels(tokens.shape[0], axis_name)
  own_logit = jnp.take_along_axis(logits, own[:, None, None], axis=-1)[..., 0]
  per_token = jax.nn.logsumexp(logits, axis=-1) - own_logit
  return mean_over_valid(per_token, token_mask, axis_name)


GLA_KINDS = ("mean", "token")


def gla_loss(
    image_tokens,
    text_tokens,
    text_mask,
    z_image,
    z_text,
    *,
    margin=0.2,
    axis_name=None,
    image_mask=None,
    kind="mean",
    temperature=0.1,
):
  """Both GLA directions averaged: patches vs text globals and words vs image globals.

  ``kind`` 'mean' (the paper's: :func:`global_to_local_alignment`, a hinge of ``margin`` on the
  mean cosines) or 'token' (:func:`token_to_global_infonce` at ``temperature``).
  """
  if kind not in GLA_KINDS:
    raise ValueError(f"unknown GLA kind {kind!r}; expected one of {GLA_KINDS}")
  if image_mask is None:
    image_mask = jnp.ones(image_tokens.shape[:2], bool)
  if kind == "mean":
    one_way = functools.partial(global_to_local_alignment, margin=margin, axis_name=axis_name)
  else:
    one_way = functools.partial(
        token_to_global_infonce, temperature=temperature, axis_name=axis_name
    )
  return 0.5 * (
      one_way(image_tokens, image_mask, z_text) + one_way(text_tokens, text_mask, z_image)
  )


def pearson_correlation(a, b, mask=None, *, eps=1e-12):
  """Pearson correlation of ``a`` and ``b`` along the last axis over the entries where ``mask``.

  Returns (corr [...], valid [...]); a row is valid with at least two entries. A constant row has
  correlation 0 (``eps`` keeps the division finite).
  """
  if mask is None:
    mask = jnp.ones(a.shape, bool)
  mask = jnp.broadcast_to(mask, a.shape).astype(jnp.float32)
  count = jnp.sum(mask, -1, keepdims=True)
  center = lambda x: (x - jnp.sum(x * mask, -1, keepdims=True) / jnp.maximum(count, 1.0)) * mask
  da, db = center(a.astype(jnp.float32)), center(b.astype(jnp.float32))
  covariance = jnp.sum(da * db, -1)
  scale = jnp.sqrt(jnp.sum(da * da, -1) + eps) * jnp.sqrt(jnp.sum(db * db, -1) + eps)
  return covariance / scale, count[..., 0] >= 2


def correlation_distillation(teacher, student, mask=None, row_mask=None, *, axis_name=None):
  """1 - mean over valid rows k of corr(teacher[k], student[k]); the teacher gets no gradient."""
  corr, valid = pearson_correlation(jax.lax.stop_gradient(teacher), student, mask)
  if row_mask is not None:
    valid = valid & row_mask
  return 1.0 - mean_over_valid(corr, valid, axis_name)


def local_distillation(
    teacher_tokens, student_tokens, token_mask, *, include_self=False, axis_name=None
):
  """LD: within-sample token-token cosine rows of the student correlate with the teacher's.

  Rows and entries run over the sample's valid tokens; the self-similarity entry (1 for both) is
  left out unless ``include_self``.
  """

  def token_similarity(x):
    x = l2_normalize(x)
    return jnp.einsum("btd,bsd->bts", x, x)

  entries = token_mask[:, :, None] & token_mask[:, None, :]
  if not include_self:
    entries = entries & ~jnp.eye(token_mask.shape[1], dtype=bool)
  teacher, student = token_similarity(teacher_tokens), token_similarity(student_tokens)
  return correlation_distillation(teacher, student, entries, token_mask, axis_name=axis_name)


def global_distillation(
    teacher_a, teacher_b, student_a, student_b, *, include_self=False, axis_name=None
):
  """GD: rows of the in-batch similarity matrix a_i . b_j (all j across devices) correlate.

  Pass the same embeddings as ``a`` and ``b`` for a within-modality matrix, or image and text
  globals for the cross-modal one. The diagonal entry a_i . b_i is left out unless
  ``include_self``: in a within-modality matrix it is 1 for teacher and student alike, and that
  shared outlier alone makes any two rows correlate (an unrelated teacher and student give a loss
  of about 0.35 at batch 32 with it, about 1.0 without).
  """
  teacher = l2_normalize(teacher_a) @ gather(l2_normalize(teacher_b), axis_name).T
  student = l2_normalize(student_a) @ gather(l2_normalize(student_b), axis_name).T
  entries = None
  if not include_self:
    own = local_labels(teacher.shape[0], axis_name)
    entries = jnp.arange(teacher.shape[1])[None, :] != own[:, None]
  return correlation_distillation(teacher, student, entries, axis_name=axis_name)


def _quality_metrics(prefix, predicted, truth, valid, axis_name):
  quality = masks_lib.mask_quality(predicted, truth, valid, axis_name=axis_name)
  return {f"{prefix}_{k}": v for k, v in quality.items()}


def stage1_loss(
    outputs,
    batch,
    *,
    axis_name=None,
    itc_weight=1.0,
    gla_weight=1.0,
    ld_weight=0.1,
    gd_weight=0.1,
    gla_margin=0.2,
    gla_kind="mean",
    gla_temperature=0.1,
    gd_include_self=False,
    temperature=None,
    patch_label_fraction=0.25,
):
  """Stage 1: masked ITC + GLA + local and global Pearson distillation, weighted and summed.

  Reads the stage-1 forward's outputs: adapted ``image_tokens`` [B,P,d] / ``text_tokens`` [B,L,d]
  with ``text_mask``; the unmasked unimodal globals ``z_image`` / ``z_text``; ``masked_z_image`` /
  ``masked_z_text`` (f_V, f_L: the joint encoder under the annealed intersection masks); the
  frozen teacher's ``teacher_{image,text}_tokens`` and ``teacher_{image,text}_global``; the masks
  and thresholds of ``masks.fit_masks``; ``rho`` and ``logit_scale``.

  - masked ITC: f_V and f_L aligned by bidirectional InfoNCE (``temperature`` fixed, or the model's
    learnable one when None).
  - GLA (margin ``gla_margin``), both directions, negatives from all devices; ``gla_kind``
    'token' contrasts each token on its own instead (temperature ``gla_temperature``, see
    :func:`gla_loss`).
  - LD: within-sample token-token cosines of the adapted tokens vs the teacher's tokens, both
    modalities averaged. GD: rows of the in-batch image-image and text-text similarity of the
    unmasked globals vs the teacher's pooled vectors (within-modality matrices: a teacher that is
    not cross-modally aligned still defines them), without their diagonal unless
    ``gd_include_self``.
  Mask quality against the batch's ground truth (``text_intersection`` [B,L], ``image_labels``
  [B,H,W], see ``masks.patch_labels``) is reported whenever the batch carries it.
  """
  image_tokens, text_tokens = outputs["image_tokens"], outputs["text_tokens"]
  text_mask = outputs["text_mask"]
  z_image, z_text = outputs["z_image"], outputs["z_text"]
  itc, itc_metrics = clip_loss(
      {
          "z_image": outputs["masked_z_image"],
          "z_text": outputs["masked_z_text"],
          "logit_scale": outputs["logit_scale"],
      },
      batch,
      axis_name=axis_name,
      temperature=temperature,
  )
  gla = gla_loss(
      image_tokens,
      text_tokens,
      text_mask,
      z_image,
      z_text,
      margin=gla_margin,
      axis_name=axis_name,
      kind=gla_kind,
      temperature=gla_temperature,
  )
  patch_valid = jnp.ones(image_tokens.shape[:2], bool)
  ld = 0.5 * (
      local_distillation(
          outputs["teacher_image_tokens"], image_tokens, patch_valid, axis_name=axis_name
      )
      + local_distillation(
          outputs["teacher_text_tokens"], text_tokens, text_mask, axis_name=axis_name
      )
  )
  t_image, t_text = outputs["teacher_image_global"], outputs["teacher_text_global"]
  gd = 0.5 * sum(
      global_distillation(t, t, z, z, include_self=gd_include_self, axis_name=axis_name)
      for t, z in ((t_image, z_image), (t_text, z_text))
  )
  loss = itc_weight * itc + gla_weight * gla + ld_weight * ld + gd_weight * gd

  image_mask, text_mask_hat = outputs["image_intersection_mask"], outputs["text_intersection_mask"]
  metrics = {
      "loss_itc": itc,
      "loss_gla": gla,
      "loss_ld": ld,
      "loss_gd": gd,
      "acc_itc": itc_metrics["acc_i2t"],
      "scale": itc_metrics["scale"],
      "rho": outputs["rho"],
      "image_threshold": outputs["image_threshold"],
      "text_threshold": outputs["text_threshold"],
      "image_mask_fraction": global_mean(image_mask, axis_name=axis_name),
      "text_mask_fraction": global_mean(text_mask_hat, text_mask, axis_name),
  }
  if "text_intersection" in batch:
    truth = batch["text_intersection"] == masks_lib.INTERSECTION_LABEL
    metrics.update(_quality_metrics("text_mask", text_mask_hat, truth, text_mask, axis_name))
  if "image_labels" in batch:
    truth = masks_lib.patch_labels(
        batch["image_labels"],
        masks_lib.patch_grid(image_tokens.shape[1]),
        min_fraction=patch_label_fraction,
    )
    metrics.update(_quality_metrics("patch_mask", image_mask, truth, patch_valid, axis_name))
  return loss, metrics


# --------------------------------------------------------------------------------------------------
# Stage 2: multi-positive InfoNCE over the views
# --------------------------------------------------------------------------------------------------


def stage2_contrastive_loss(
    f_anchor,
    f_positive,
    f_negative,
    has_positive,
    has_negative,
    *,
    temperature=0.05,
    symmetric=True,
    axis_name=None,
    impl="dense",
    block_size=chunked.DEFAULT_BLOCK_SIZE,
):
  """Multi-positive InfoNCE over the joint embeddings of each sample's three views.

  Candidates are every sample's (all devices) original, positive view and hard-negative view. For
  the original of sample i, P(i) = {its positive view}; N(i) = its own hard negative (when
  ``has_negative``) and all views of the other samples (their negative views only where valid). With
  ``symmetric`` the positive views are anchors too, with the original as their positive. Anchors
  without a real positive view (``has_positive`` False) are left out of the mean.

  Args:
    f_anchor, f_positive, f_negative: [B,d] joint embeddings. has_positive, has_negative: [B] bool.
    impl, block_size: ``"dense"`` builds the [B, 3N] masks and logits; ``"chunked"`` / ``"ring"``
      the same loss ``block_size`` candidates at a time (``mmret.losses.chunked``).
  """
  chunked.check_impl(impl, block_size)
  if impl != "dense":
    return _stage2_blockwise(
        f_anchor,
        f_positive,
        f_negative,
        has_positive,
        has_negative,
        temperature=temperature,
        symmetric=symmetric,
        axis_name=axis_name,
        impl=impl,
        block_size=block_size,
    )
  batch = f_anchor.shape[0]
  candidates = jnp.concatenate([gather(f, axis_name) for f in (f_anchor, f_positive, f_negative)])
  n_global = candidates.shape[0] // 3
  all_has_positive = gather(has_positive, axis_name)
  all_has_negative = gather(has_negative, axis_name)
  column_valid = jnp.concatenate([jnp.ones((n_global,), bool), all_has_positive, all_has_negative])
  column_sample = jnp.tile(jnp.arange(n_global), 3)
  column_view = jnp.repeat(jnp.arange(3), n_global)
  own = local_labels(batch, axis_name)
  same_sample = column_sample[None, :] == own[:, None]  # [B,3N]
  others = ~same_sample & column_valid[None, :]
  own_negative = same_sample & (column_view == 2)[None, :] & has_negative[:, None]

  def anchored(anchors, positive_view):
    positive = same_sample & (column_view == positive_view)[None, :] & has_positive[:, None]
    return multi_positive_infonce(
        anchors, candidates, positive, others | own_negative, temperature=temperature
    )

  losses, valid = anchored(f_anchor, positive_view=1)
  if symmetric:
    loss_p, valid_p = anchored(f_positive, positive_view=0)
    losses, valid = jnp.concatenate([losses, loss_p]), jnp.concatenate([valid, valid_p])
  return mean_over_valid(losses, valid, axis_name)


def _stage2_blockwise(
    f_anchor, f_positive, f_negative, has_positive, has_negative, *, symmetric, **kwargs
):
  """:func:`stage2_contrastive_loss` with its masks written per block of (anchors, candidates)."""
  own = local_labels(f_anchor.shape[0], axis_name=kwargs["axis_name"])
  anchors, positive_view = [f_anchor], [jnp.ones_like(own)]
  if symmetric:  # the positive views anchor too, with the original as their positive
    anchors.append(f_positive)
    positive_view.append(jnp.zeros_like(own))
  n = len(anchors)
  anchor_info = {
      "sample": jnp.tile(own, n),
      "positive_view": jnp.concatenate(positive_view),
      "has_positive": jnp.tile(has_positive, n),
      "has_negative": jnp.tile(has_negative, n),
  }

  def masks(row, col):
    same = col["sample"][None, :] == row["sample"][:, None]
    view = col["piece"][None, :]
    positive = same & (view == row["positive_view"][:, None]) & row["has_positive"][:, None]
    others = ~same & col["valid"][None, :]
    own_negative = same & (view == 2) & row["has_negative"][:, None]
    return positive, others | own_negative

  losses, valid = chunked.multi_positive_infonce(
      jnp.concatenate(anchors),
      (f_anchor, f_positive, f_negative),
      masks,
      anchor_info=anchor_info,
      candidate_info={"valid": [jnp.ones_like(has_positive), has_positive, has_negative]},
      **kwargs,
  )
  return mean_over_valid(losses, valid, kwargs["axis_name"])


def stage2_loss(
    outputs,
    batch,
    *,
    axis_name=None,
    temperature=0.05,
    symmetric=True,
    impl="dense",
    block_size=chunked.DEFAULT_BLOCK_SIZE,
):
  """Stage 2: :func:`stage2_contrastive_loss` over the stage-2 forward's view embeddings.

  Reads ``z_anchor``, ``z_positive``, ``z_negative`` [B,d] (the joint embeddings of each sample's
  original, positive and hard-negative views), ``has_positive`` / ``has_negative`` [B], the keep
  masks of the views and the thresholds the views came from (reported as metrics). ``impl`` and
  ``block_size`` (``config.loss.impl``: dense | chunked | ring) pick how the loss is computed.
  """
  del batch
  f_anchor, f_positive = outputs["z_anchor"], outputs["z_positive"]
  f_negative = outputs["z_negative"]
  has_positive, has_negative = outputs["has_positive"], outputs["has_negative"]
  loss = stage2_contrastive_loss(
      f_anchor,
      f_positive,
      f_negative,
      has_positive,
      has_negative,
      temperature=temperature,
      symmetric=symmetric,
      axis_name=axis_name,
      impl=impl,
      block_size=block_size,
  )
  text_mask = outputs["text_mask"]
  metrics = {
      "image_threshold": outputs["image_threshold"],
      "text_threshold": outputs["text_threshold"],
      "has_positive": global_mean(has_positive, axis_name=axis_name),
      "has_negative": global_mean(has_negative, axis_name=axis_name),
      "sim_positive": global_mean(jnp.sum(f_anchor * f_positive, -1), axis_name=axis_name),
      "sim_negative": global_mean(jnp.sum(f_anchor * f_negative, -1), has_negative, axis_name),
      "text_positive_kept": global_mean(outputs["text_positive_keep"], text_mask, axis_name),
      "image_positive_kept": global_mean(outputs["image_positive_keep"], axis_name=axis_name),
  }
  return loss, metrics
