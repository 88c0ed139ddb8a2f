"""SOLAR: learn which tokens/patches two modalities share (stage 1), then train a joint embedding on
views built by masking them (stage 2). Pure functions of arrays.

Shapes: B local batch, N global batch (all devices), T tokens (text) or P patches (image), d width.
Token features are L2-normalised before any similarity, so scores are cosines. Functions taking
``axis_name`` gather the other devices' samples over it and return values whose ``pmean`` over the
devices equals the single-device value on the global batch.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmret.losses.common import gather, global_offset, local_labels
from mmret.losses.selfalign import MASKED_LOGIT, l2_normalize, mean_over_valid

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
):
  """Both GLA directions averaged: patches vs text globals and words vs image globals."""
  if image_mask is None:
    image_mask = jnp.ones(image_tokens.shape[:2], bool)
  patches = global_to_local_alignment(
      image_tokens, image_mask, z_text, margin=margin, axis_name=axis_name
  )
  words = global_to_local_alignment(
      text_tokens, text_mask, z_image, margin=margin, axis_name=axis_name
  )
  return 0.5 * (patches + words)


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


def global_distillation(teacher_a, teacher_b, student_a, student_b, *, axis_name=None):
  """GD: rows of the in-batch similarity matrix a_i . b_j (all j across devices) correlate.

  Pass the same embeddings as ``a`` and ``b`` for a within-modality matrix, or image and text
  globals for the cross-modal one.
  """
  teacher = l2_normalize(teacher_a) @ gather(l2_normalize(teacher_b), axis_name).T
  student = l2_normalize(student_a) @ gather(l2_normalize(student_b), axis_name).T
  return correlation_distillation(teacher, student, axis_name=axis_name)


# --------------------------------------------------------------------------------------------------
# Stage 1: intersection mask from a Gaussian density crossing
# --------------------------------------------------------------------------------------------------


def gaussian_crossing(mean_a, var_a, mean_b, var_b, *, equal_variance_rtol=1e-6):
  """Where the densities N(mean_a, var_a) and N(mean_b, var_b) are equal.

  Equating the log-densities gives a x^2 + b x + c = 0 with a = 1/var_a - 1/var_b,
  b = -2 (mean_a/var_a - mean_b/var_b), c = mean_a^2/var_a - mean_b^2/var_b + log(var_a/var_b).
  With (relatively) equal variances the root is linear, -c/b = the midpoint of the means; otherwise
  the root between the two means is returned (when neither root lies between them, e.g. for equal
  means, the root nearest to their midpoint). Identical Gaussians give their mean.
  """
  mean_a, var_a, mean_b, var_b = (
      jnp.asarray(x, jnp.float32) for x in (mean_a, var_a, mean_b, var_b)
  )
  qa = 1.0 / var_a - 1.0 / var_b
  qb = -2.0 * (mean_a / var_a - mean_b / var_b)
  qc = mean_a**2 / var_a - mean_b**2 / var_b + jnp.log(var_a / var_b)
  midpoint = 0.5 * (mean_a + mean_b)
  linear = jnp.abs(qa) <= equal_variance_rtol * (1.0 / var_a + 1.0 / var_b)
  linear_root = jnp.where(qb == 0, midpoint, -qc / jnp.where(qb == 0, 1.0, qb))
  # Numerically stable pair of roots: q/a and c/q.
  sqrt_disc = jnp.sqrt(jnp.maximum(qb**2 - 4.0 * qa * qc, 0.0))
  q = -0.5 * (qb + jnp.where(qb >= 0, 1.0, -1.0) * sqrt_disc)
  root_1 = q / jnp.where(linear, 1.0, qa)
  root_2 = jnp.where(q == 0, root_1, qc / jnp.where(q == 0, 1.0, q))
  low, high = jnp.minimum(mean_a, mean_b), jnp.maximum(mean_a, mean_b)
  between = lambda r: (r >= low) & (r <= high)
  nearest = jnp.where(jnp.abs(root_1 - midpoint) <= jnp.abs(root_2 - midpoint), root_1, root_2)
  quadratic_root = jnp.where(between(root_1), root_1, jnp.where(between(root_2), root_2, nearest))
  return jnp.where(linear, linear_root, quadratic_root)


def _masked_moments(x, mask, axis_name, min_variance):
  mask = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
  mask = mask.astype(jnp.float32)
  total = lambda v: v if axis_name is None else jax.lax.psum(v, axis_name)
  count = jnp.maximum(total(jnp.sum(mask)), 1.0)
  mean = total(jnp.sum(x * mask)) / count
  variance = total(jnp.sum(((x - mean) * mask) ** 2)) / count
  return mean, jnp.maximum(variance, min_variance)


def fit_threshold(
    positive_scores,
    negative_scores,
    positive_mask=None,
    negative_mask=None,
    *,
    axis_name=None,
    min_variance=1e-6,
):
  """Threshold between score samples of positive and negative pairs (no gradient).

  Fits one Gaussian to each set (mean and population variance over the masked entries of all
  devices, variance floored at ``min_variance``) and returns their :func:`gaussian_crossing`.
  """
  positive_scores = jax.lax.stop_gradient(positive_scores.astype(jnp.float32))
  negative_scores = jax.lax.stop_gradient(negative_scores.astype(jnp.float32))
  pos_mean, pos_var = _masked_moments(positive_scores, positive_mask, axis_name, min_variance)
  neg_mean, neg_var = _masked_moments(negative_scores, negative_mask, axis_name, min_variance)
  return gaussian_crossing(pos_mean, pos_var, neg_mean, neg_var)


def token_scores(tokens, partner_global):
  """s[b,t] = cos(token t of sample b, partner global of sample b): [B,T,d], [B,d] -> [B,T]."""
  return jnp.einsum("btd,bd->bt", l2_normalize(tokens), l2_normalize(partner_global))


def token_score_samples(tokens, token_mask, partner_global, *, axis_name=None):
  """Scores of tokens against their own partner (positives) and the other samples' (negatives).

  Returns (positive [B,T], positive_mask [B,T], negative [B,T,N], negative_mask [B,T,N]).
  """
  partners = gather(l2_normalize(partner_global), axis_name)
  tokens = l2_normalize(tokens)
  negative = jnp.einsum("btd,nd->btn", tokens, partners)
  own = local_labels(tokens.shape[0], axis_name)
  is_other = jnp.arange(partners.shape[0])[None, :] != own[:, None]
  negative_mask = token_mask[:, :, None] & is_other[:, None, :]
  return token_scores(tokens, partner_global), token_mask, negative, negative_mask


def intersection_threshold(
    tokens, token_mask, partner_global, *, axis_name=None, min_variance=1e-6
):
  """Density-crossing threshold of one modality's token scores (own partner vs in-batch others)."""
  samples = token_score_samples(tokens, token_mask, partner_global, axis_name=axis_name)
  positive, positive_mask, negative, negative_mask = samples
  return fit_threshold(
      positive,
      negative,
      positive_mask,
      negative_mask,
      axis_name=axis_name,
      min_variance=min_variance,
  )


def intersection_mask(scores, threshold, token_mask=None):
  """M_hat = 1[s > threshold] (and a real token), as float32 with no gradient."""
  mask = scores > threshold
  if token_mask is not None:
    mask = mask & token_mask
  return jax.lax.stop_gradient(mask.astype(jnp.float32))


def anneal_rho(step, anneal_steps, *, schedule="linear"):
  """rho(step): 1 at step 0, falling to 0 at ``anneal_steps`` and after (jit-able in ``step``).

  ``schedule`` is 'linear' (1 - progress) or 'cosine' (0.5 (1 + cos(pi progress))).
  """
  if anneal_steps <= 0:
    return jnp.zeros((), jnp.float32)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  if schedule == "linear":
    return 1.0 - progress
  if schedule == "cosine":
    return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  raise ValueError(f"unknown anneal schedule {schedule!r}; expected 'linear' or 'cosine'")


def annealed_mask(hard_mask, rho, token_mask=None):
  """M = rho + (1 - rho) M_hat: all tokens visible at rho = 1, only the intersection at rho = 0.

  Padding stays 0 when ``token_mask`` is given.
  """
  mask = rho + (1.0 - rho) * hard_mask
  if token_mask is not None:
    mask = mask * token_mask
  return mask


# --------------------------------------------------------------------------------------------------
# Stage 2: positive / hard-negative views
# --------------------------------------------------------------------------------------------------


def sample_keys(rng, local_batch, *, axis_name=None):
  """One PRNG key per sample, folded from its global index so that sharding does not change it."""
  index = global_offset(local_batch, axis_name) + jnp.arange(local_batch)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def masked_views(keys, intersection, valid, *, mask_ratio=0.3, negative_ratio=1.0, protected=None):
  """Keep-masks of a positive and a hard-negative view over units (tokens or segments) [B,U].

  Positive: drops a random ``mask_ratio`` of the sample's intersection units (rounded, at least one,
  always keeping one; none when it has fewer than two). Hard negative: drops a random
  ``negative_ratio`` of its difference units (valid, not intersection; at least one when any exist).
  ``protected`` units are never dropped. Per-sample randomness comes from ``keys`` [B].

  Returns dict with ``positive_keep``, ``negative_keep`` [B,U] bool and ``has_positive``,
  ``has_negative`` [B] (whether the view differs from the original).
  """
  intersection = intersection & valid
  droppable = valid if protected is None else valid & ~protected
  key_pos, key_neg = (jax.vmap(lambda k: jax.random.fold_in(k, i))(keys) for i in (0, 1))

  def drop_random(unit_keys, candidates, n_drop):
    noise = jax.vmap(lambda k: jax.random.uniform(k, candidates.shape[1:]))(unit_keys)
    noise = jnp.where(candidates, noise, 2.0)  # non-candidates rank last
    rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
    return candidates & (rank < n_drop[:, None])

  shared = intersection & droppable
  n_shared = jnp.sum(shared, -1)
  n_pos = jnp.where(n_shared >= 2, jnp.clip(jnp.round(mask_ratio * n_shared), 1, n_shared - 1), 0)
  difference = valid & ~intersection & droppable
  n_difference = jnp.sum(difference, -1)
  n_neg = jnp.where(
      n_difference >= 1, jnp.clip(jnp.round(negative_ratio * n_difference), 1, n_difference), 0
  )
  drop_pos = drop_random(key_pos, shared, n_pos.astype(jnp.int32))
  drop_neg = drop_random(key_neg, difference, n_neg.astype(jnp.int32))
  return {
      "positive_keep": valid & ~drop_pos,
      "negative_keep": valid & ~drop_neg,
      "has_positive": n_pos > 0,
      "has_negative": n_neg > 0,
  }


def _grid_seeds(grid_shape, num_segments):
  """Flat patch indices of ``num_segments`` seeds spread over the patch grid (cell centres)."""
  height, width = grid_shape
  rows = max(1, min(height, round(math.sqrt(num_segments * height / width))))
  cols = max(1, min(width, math.ceil(num_segments / rows)))
  while rows * cols < num_segments:
    rows, cols = min(height, rows + 1), min(width, cols + 1)
  centres = [
      (int((r + 0.5) * height / rows), int((c + 0.5) * width / cols))
      for r in range(rows)
      for c in range(cols)
  ]
  pick = np.linspace(0, len(centres) - 1, num_segments).round().astype(int)
  return np.array([centres[i][0] * width + centres[i][1] for i in pick])


def patch_segments(patch_features, grid_shape, num_segments, *, iterations=5, position_weight=1.0):
  """Groups patches into ``num_segments`` segments: k-means on features + grid position (SLIC-like).

  Each patch is described by its L2-normalised feature and its (row, col) scaled to [0, 1] times
  ``position_weight`` (larger: more compact segments). Centres start at patches spread over the grid
  and follow ``iterations`` rounds of nearest-centre assignment and mean update (an empty segment
  keeps its centre). Static shapes, no gradient. Returns int32 segment ids [B,P].
  """
  batch, n_patches, _ = patch_features.shape
  height, width = grid_shape
  if height * width != n_patches:
    raise ValueError(f"patch grid {grid_shape} does not hold the {n_patches} patches")
  if not 1 <= num_segments <= n_patches:
    raise ValueError(f"num_segments={num_segments} must be in [1, {n_patches}]")
  rows, cols = np.divmod(np.arange(n_patches), width)
  position = np.stack([rows / max(height - 1, 1), cols / max(width - 1, 1)], -1)
  features = l2_normalize(jax.lax.stop_gradient(patch_features).astype(jnp.float32))
  points = jnp.concatenate(
      [features, jnp.broadcast_to(position_weight * position, (batch, n_patches, 2))], -1
  )
  centres = points[:, _grid_seeds(grid_shape, num_segments)]  # [B,S,D]

  def assign(centres):
    distance = (
        jnp.sum(points**2, -1)[:, :, None]
        - 2 * jnp.einsum("bpd,bsd->bps", points, centres)
        + jnp.sum(centres**2, -1)[:, None, :]
    )
    return jnp.argmin(distance, axis=-1)

  for _ in range(iterations):
    members = jax.nn.one_hot(assign(centres), num_segments)  # [B,P,S]
    counts = jnp.sum(members, 1)[..., None]
    means = jnp.einsum("bps,bpd->bsd", members, points) / jnp.maximum(counts, 1.0)
    centres = jnp.where(counts > 0, means, centres)
  return assign(centres).astype(jnp.int32)


def segment_scores(patch_scores, segment_ids, num_segments):
  """Mean patch score per segment: ([B,P], [B,P]) -> (scores [B,S], non-empty [B,S])."""
  members = jax.nn.one_hot(segment_ids, num_segments)
  counts = jnp.sum(members, 1)
  scores = jnp.einsum("bps,bp->bs", members, patch_scores) / jnp.maximum(counts, 1.0)
  return scores, counts > 0


def image_views(
    keys, patch_scores, segment_ids, num_segments, threshold, *, mask_ratio=0.3, negative_ratio=1.0
):
  """Patch keep-masks of the image views: segments whose mean score exceeds ``threshold`` are the
  intersection; :func:`masked_views` picks segments to drop and every patch follows its segment."""
  scores, non_empty = segment_scores(patch_scores, segment_ids, num_segments)
  views = masked_views(
      keys, scores > threshold, non_empty, mask_ratio=mask_ratio, negative_ratio=negative_ratio
  )
  to_patches = lambda keep: jnp.take_along_axis(keep, segment_ids, axis=1)
  return dict(
      views,
      positive_keep=to_patches(views["positive_keep"]),
      negative_keep=to_patches(views["negative_keep"]),
  )


VIEW_MODES = ("both", "text", "image", "random")


def masked_modalities(keys, mode="random"):
  """Which modalities each sample's views mask: (text [B], image [B]) bools.

  'both', 'text', 'image' apply to every sample; 'random' picks text only, image only or both
  uniformly per sample.
  """
  batch = keys.shape[0]
  if mode == "random":
    choice = jax.vmap(lambda k: jax.random.randint(k, (), 0, 3))(keys)
    return choice != 1, choice != 0  # 0: text only, 1: image only, 2: both
  if mode not in VIEW_MODES:
    raise ValueError(f"unknown view mode {mode!r}; expected one of {VIEW_MODES}")
  return (
      jnp.full((batch,), mode in ("both", "text")),
      jnp.full((batch,), mode in ("both", "image")),
  )


def stage2_views(
    rng,
    text_scores,
    text_threshold,
    text_mask,
    patch_scores,
    image_threshold,
    segment_ids,
    num_segments,
    *,
    mode="random",
    mask_ratio=0.3,
    negative_ratio=1.0,
    text_protected=None,
    axis_name=None,
):
  """Text and image keep-masks for each sample's positive and hard-negative views.

  Text tokens scoring above ``text_threshold`` are the intersection; image segments likewise by mean
  patch score. A modality not chosen by ``mode`` for a sample keeps all its units in both views.
  Returns dict: ``{text,image}_{positive,negative}_keep`` and ``has_positive``/``has_negative`` [B]
  (whether some chosen modality actually changed).
  """
  keys = sample_keys(rng, text_scores.shape[0], axis_name=axis_name)
  split = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
  text = masked_views(
      split(0),
      text_scores > text_threshold,
      text_mask,
      mask_ratio=mask_ratio,
      negative_ratio=negative_ratio,
      protected=text_protected,
  )
  image = image_views(
      split(1),
      patch_scores,
      segment_ids,
      num_segments,
      image_threshold,
      mask_ratio=mask_ratio,
      negative_ratio=negative_ratio,
  )
  use_text, use_image = masked_modalities(split(2), mode)
  all_patches = jnp.ones(patch_scores.shape, bool)
  pick = lambda use, keep, full: jnp.where(use[:, None], keep, full)
  return {
      "text_positive_keep": pick(use_text, text["positive_keep"], text_mask),
      "text_negative_keep": pick(use_text, text["negative_keep"], text_mask),
      "image_positive_keep": pick(use_image, image["positive_keep"], all_patches),
      "image_negative_keep": pick(use_image, image["negative_keep"], all_patches),
      "has_positive": (use_text & text["has_positive"]) | (use_image & image["has_positive"]),
      "has_negative": (use_text & text["has_negative"]) | (use_image & image["has_negative"]),
  }


# --------------------------------------------------------------------------------------------------
# Stage 2: multi-positive InfoNCE
# --------------------------------------------------------------------------------------------------


def multi_positive_infonce(anchors, candidates, positive_mask, negative_mask, *, temperature=0.05):
  """Per anchor: -log(sum_{P} e^{f.g/T} / sum_{P u N} e^{f.g/T}).

  Args:
    anchors: [A,d]. candidates: [C,d].
    positive_mask, negative_mask: [A,C] bool, P(i) and N(i) (an entry in both counts once).
  Returns (loss [A], valid [A]); an anchor without a positive has loss 0 and valid False.
  """
  logits = (anchors @ candidates.T).astype(jnp.float32) / temperature
  positive_lse = jax.nn.logsumexp(jnp.where(positive_mask, logits, MASKED_LOGIT), axis=-1)
  all_lse = jax.nn.logsumexp(jnp.where(positive_mask | negative_mask, logits, MASKED_LOGIT), -1)
  valid = jnp.any(positive_mask, axis=-1)
  return jnp.where(valid, all_lse - positive_lse, 0.0), valid


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
):
  """Multi-positive InfoNCE over the joint embeddings of each sample's three views.

  Candidates are every sample's (all devices) original, positive view and hard-negative view. For
  the original of sample i, P(i) = {its positive view}; N(i) = its own hard negative (when
  ``has_negative``) and all views of the other samples (their negative views only where valid). With
  ``symmetric`` the positive views are anchors too, with the original as their positive. Anchors
  without a real positive view (``has_positive`` False) are left out of the mean.

  Args:
    f_anchor, f_positive, f_negative: [B,d] joint embeddings. has_positive, has_negative: [B] bool.
  """
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
