"""SOLAR's intersection masks: token scores, the density-crossing threshold, annealing, quality.

Shapes: B local batch, N global batch (all devices), T tokens (text) or P patches (image), d width.
Token features are L2-normalised before any similarity, so scores are cosines. :func:`fit_masks`
is the one place masks are fitted: both training stages and the mask evaluator call it.
"""

import functools
import math

import jax
import jax.numpy as jnp

from mmret.losses.common import gather, local_labels
from mmret.ops import l2_normalize

INTERSECTION_LABEL = 1  # value of intersection tokens / object pixels in the ground truth
DIFFERENCE_LABEL = 2  # text-only fact words / image-only object pixels

# --------------------------------------------------------------------------------------------------
# Threshold: where the Gaussian densities of positive-pair and negative-pair scores cross
# --------------------------------------------------------------------------------------------------


def gaussian_crossing(
    mean_a, var_a, mean_b, var_b, *, weight_a=1.0, weight_b=1.0, equal_variance_rtol=1e-6
):
  """Where the (weighted) densities w_a N(mean_a, var_a) and w_b N(mean_b, var_b) are equal.

  Equating the log-densities gives a x^2 + b x + c = 0 with a = 1/var_a - 1/var_b,
  b = -2 (mean_a/var_a - mean_b/var_b), c = mean_a^2/var_a - mean_b^2/var_b + log(var_a/var_b)
  - 2 log(w_a/w_b) (equal weights by default: the paper's density crossing).
  With (relatively) equal variances the root is linear, -c/b = the midpoint of the means; otherwise
  the root between the two means is returned (when neither root lies between them, e.g. for equal
  means, the root nearest to their midpoint). Identical Gaussians give their mean.
  """
  mean_a, var_a, mean_b, var_b, weight_a, weight_b = (
      jnp.asarray(x, jnp.float32) for x in (mean_a, var_a, mean_b, var_b, weight_a, weight_b)
  )
  qa = 1.0 / var_a - 1.0 / var_b
  qb = -2.0 * (mean_a / var_a - mean_b / var_b)
  qc = (
      mean_a**2 / var_a
      - mean_b**2 / var_b
      + jnp.log(var_a / var_b)
      - 2.0 * jnp.log(weight_a / weight_b)
  )
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


def _total(value, axis_name):
  return value if axis_name is None else jax.lax.psum(value, axis_name)


def _weighted_moments(x, weights, axis_name, min_variance, min_weight=1.0):
  """Weighted mean, population variance (floored at ``min_variance``) and total weight of ``x``
  over all devices; ``weights`` (float, same shape) may be a 0/1 mask or EM responsibilities."""
  weight = _total(jnp.sum(weights), axis_name)
  mean = _total(jnp.sum(weights * x), axis_name) / jnp.maximum(weight, min_weight)
  variance = _total(jnp.sum(weights * (x - mean) ** 2), axis_name) / jnp.maximum(weight, min_weight)
  return mean, jnp.maximum(variance, min_variance), weight


def _mask_weights(x, mask):
  mask = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
  return mask.astype(jnp.float32)


def _masked_moments(x, mask, axis_name, min_variance):
  mean, variance, _ = _weighted_moments(x, _mask_weights(x, mask), axis_name, min_variance)
  return mean, variance


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


THRESHOLDS = ("pairs", "mixture")


def fit_mixture_threshold(
    positive_scores,
    negative_scores,
    positive_mask=None,
    negative_mask=None,
    *,
    axis_name=None,
    min_variance=1e-6,
    iterations=30,
):
  """Threshold between the intersection and the difference units *inside* positive pairs.

  A positive pair's units are a mixture: intersection units (their partner carries their meaning)
  and difference units, which should relate to their own partner little more than to another
  sample's. EM fits two Gaussians and a weight pi to the positive-pair scores, starting the
  difference component at the negative-pair scores' Gaussian and the intersection component at the
  positive scores above their mean; the threshold is where pi N_1 = (1 - pi) N_0 (posterior 1/2,
  :func:`gaussian_crossing` with weights). Both components stay free, so difference units that
  lean towards their own partner (contextual features) do not pull the threshold below them. Runs
  ``iterations`` EM steps; sums over all devices.
  Returns (threshold, {'mean', 'variance', 'weight'} of the intersection component).
  """
  x = jax.lax.stop_gradient(positive_scores.astype(jnp.float32))
  negative_scores = jax.lax.stop_gradient(negative_scores.astype(jnp.float32))
  mean_0, var_0 = _masked_moments(negative_scores, negative_mask, axis_name, min_variance)
  mask = _mask_weights(x, positive_mask)
  pos_mean, _, count = _weighted_moments(x, mask, axis_name, min_variance)
  count = jnp.maximum(count, 1.0)
  upper = mask * (x > pos_mean)

  def m_step(r):
    return _weighted_moments(x, r, axis_name, min_variance, min_weight=1e-12)

  def log_normal(v, mean, var):
    return -0.5 * (jnp.log(2.0 * jnp.pi * var) + (v - mean) ** 2 / var)

  def em_step(_, params):
    (mean_1, var_1, pi), (mean_0, var_0) = params
    log_1 = jnp.log(pi) + log_normal(x, mean_1, var_1)
    log_0 = jnp.log1p(-pi) + log_normal(x, mean_0, var_0)
    r = mask * jax.nn.sigmoid(log_1 - log_0)
    mean_1, var_1, weight = m_step(r)
    pi = jnp.clip(weight / count, 1e-6, 1.0 - 1e-6)
    mean_0, var_0, _ = m_step(mask - r)
    return (mean_1, var_1, pi), (mean_0, var_0)

  mean_1, var_1, weight = m_step(upper)
  start = ((mean_1, var_1, jnp.clip(weight / count, 1e-6, 1.0 - 1e-6)), (mean_0, var_0))
  (mean_1, var_1, pi), (mean_0, var_0) = jax.lax.fori_loop(0, iterations, em_step, start)
  threshold = gaussian_crossing(mean_1, var_1, mean_0, var_0, weight_a=pi, weight_b=1.0 - pi)
  return threshold, {"mean": mean_1, "variance": var_1, "weight": pi}


def token_scores(tokens, partner_global):
  """s[b,t] = cos(token t of sample b, partner global of sample b): [B,T,d], [B,d] -> [B,T]."""
  return jnp.einsum("btd,bd->bt", l2_normalize(tokens), l2_normalize(partner_global))


SCORES = ("cosine", "contrast")


def token_score_samples(tokens, token_mask, partner_global, *, axis_name=None, score="cosine"):
  """Scores of tokens against their own partner (positives) and the other samples' (negatives).

  ``score`` 'cosine' (the paper's): s[b,t,n] = cos(token t of sample b, partner global n).
  'contrast': the same cosine minus the token's mean cosine to the other samples' partners
  (all devices), so a unit that is as close to every partner (a template word, plain
  background) scores 0 against its own partner whatever its offset, and only what tells the
  partner apart from the others scores above 0; the negatives are centred on 0 by construction.
  Returns (positive [B,T], positive_mask [B,T], negative [B,T,N], negative_mask [B,T,N]).
  """
  if score not in SCORES:
    raise ValueError(f"unknown token score {score!r}; expected one of {SCORES}")
  partners = gather(l2_normalize(partner_global), axis_name)
  tokens = l2_normalize(tokens)
  negative = jnp.einsum("btd,nd->btn", tokens, partners)
  own = local_labels(tokens.shape[0], axis_name)
  is_other = jnp.arange(partners.shape[0])[None, :] != own[:, None]
  negative_mask = token_mask[:, :, None] & is_other[:, None, :]
  positive = token_scores(tokens, partner_global)
  if score == "contrast":
    others = jnp.maximum(partners.shape[0] - 1, 1)
    offset = jnp.sum(jnp.where(is_other[:, None, :], negative, 0.0), axis=-1) / others
    positive, negative = positive - offset, negative - offset[..., None]
  return positive, token_mask, negative, negative_mask


def intersection_threshold(
    tokens,
    token_mask,
    partner_global,
    *,
    axis_name=None,
    min_variance=1e-6,
    threshold="pairs",
    score="cosine",
):
  """Threshold of one modality's token scores (own partner vs in-batch others), and the scores.

  ``threshold``: 'pairs' (the paper's: the density crossing of one Gaussian fitted to the
  positive-pair scores and one to the negative-pair scores, :func:`fit_threshold`) or 'mixture'
  (the intersection component inside the positive pairs, :func:`fit_mixture_threshold`).
  ``score``: as :func:`token_score_samples`. Returns (threshold, positive-pair scores [B,T]).
  """
  if threshold not in THRESHOLDS:
    raise ValueError(f"unknown threshold estimator {threshold!r}; expected one of {THRESHOLDS}")
  samples = token_score_samples(
      tokens, token_mask, partner_global, axis_name=axis_name, score=score
  )
  positive, positive_mask, negative, negative_mask = samples
  fit = fit_mixture_threshold if threshold == "mixture" else fit_threshold
  fitted = fit(
      positive,
      negative,
      positive_mask,
      negative_mask,
      axis_name=axis_name,
      min_variance=min_variance,
  )
  return (fitted[0] if threshold == "mixture" else fitted), positive


def fit_masks(
    image_tokens,
    text_tokens,
    text_mask,
    z_image,
    z_text,
    *,
    axis_name=None,
    min_variance=1e-6,
    threshold="pairs",
    score="cosine",
):
  """The intersection masks of a batch of pairs (no gradient through any output).

  Token scores are cosines to the partner's unimodal global (patches vs z_text, words vs z_image),
  with ``score`` 'contrast' less the unit's mean cosine to the other samples' partners
  (:func:`token_score_samples`); each modality's threshold is the density crossing of its positive-pair and in-batch-negative
  scores over all devices (``threshold`` 'pairs', the paper's), or the crossing of the intersection
  and difference components inside the positive pairs ('mixture', :func:`fit_mixture_threshold`).
  Returns ``image_scores`` [B,P], ``text_scores`` [B,L], the scalar
  ``image_threshold`` / ``text_threshold`` and the bool masks ``image_intersection_mask`` [B,P]
  and ``text_intersection_mask`` [B,L] (scores above the threshold; text padding excluded).
  """
  image_tokens, text_tokens, z_image, z_text = jax.lax.stop_gradient(
      (image_tokens, text_tokens, z_image, z_text)
  )
  patch_valid = jnp.ones(image_tokens.shape[:2], bool)
  fit = functools.partial(
      intersection_threshold,
      axis_name=axis_name,
      min_variance=min_variance,
      threshold=threshold,
      score=score,
  )
  image_threshold, image_scores = fit(image_tokens, patch_valid, z_text)
  text_threshold, text_scores = fit(text_tokens, text_mask, z_image)
  return {
      "image_scores": image_scores,
      "text_scores": text_scores,
      "image_threshold": image_threshold,
      "text_threshold": text_threshold,
      "image_intersection_mask": image_scores > image_threshold,
      "text_intersection_mask": (text_scores > text_threshold) & text_mask,
  }


def random_mask_like(keys, mask, valid):
  """A random mask with the same number of selected entries per row as ``mask`` [B,U], among the
  ``valid`` ones, each row drawn from its own key (``keys`` [B]): the random-mask ablation keeps
  each sample's mask density."""
  count = jnp.sum(mask, axis=-1)
  noise = jax.vmap(lambda k: jax.random.uniform(k, mask.shape[1:]))(keys)
  noise = jnp.where(valid, noise, 2.0)  # invalid entries rank last
  rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return (rank < count[:, None]) & valid


def randomize_masks(masks, image_keys, text_keys, text_mask):
  """``fit_masks``' output with both masks replaced by random ones of the same per-row density."""
  image_mask = masks["image_intersection_mask"]
  return dict(
      masks,
      image_intersection_mask=random_mask_like(
          image_keys, image_mask, jnp.ones(image_mask.shape, bool)
      ),
      text_intersection_mask=random_mask_like(
          text_keys, masks["text_intersection_mask"], text_mask
      ),
  )


# --------------------------------------------------------------------------------------------------
# Annealing: M = rho + (1 - rho) M_hat
# --------------------------------------------------------------------------------------------------


def anneal_rho(step, anneal_steps, *, schedule="linear", start=0):
  """rho(step): 1 up to step ``start``, falling to 0 over the next ``anneal_steps`` steps and 0
  after (jit-able in ``step``).

  ``schedule`` is 'linear' (1 - progress) or 'cosine' (0.5 (1 + cos(pi progress))).
  """
  if start < 0:
    raise ValueError(f"anneal start must be >= 0, got {start}")
  if anneal_steps <= 0:
    return jnp.where(jnp.asarray(step) < start, 1.0, 0.0).astype(jnp.float32)
  progress = jnp.clip((jnp.asarray(step, jnp.float32) - start) / anneal_steps, 0.0, 1.0)
  if schedule == "linear":
    return 1.0 - progress
  if schedule == "cosine":
    return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  raise ValueError(f"unknown anneal schedule {schedule!r}; expected 'linear' or 'cosine'")


def annealed_mask(hard_mask, rho, token_mask=None):
  """M = rho + (1 - rho) M_hat: all tokens visible at rho = 1, only the intersection at rho = 0.

  Padding stays 0 when ``token_mask`` is given.
  """
  mask = rho + (1.0 - rho) * jnp.asarray(hard_mask, jnp.float32)
  if token_mask is not None:
    mask = mask * token_mask
  return mask


# --------------------------------------------------------------------------------------------------
# Ground truth (the embedded world) and mask quality
# --------------------------------------------------------------------------------------------------


def patch_grid(num_patches: int) -> tuple[int, int]:
  """(rows, cols) of a square patch grid holding ``num_patches``."""
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(f"{num_patches} patches do not form a square grid")
  return side, side


def patch_fractions(image_labels, grid_shape, label=INTERSECTION_LABEL):
  """Fraction of each patch's pixels with pixel label ``label``: [B,H,W] -> [B,P] float32."""
  batch, height, width = image_labels.shape
  rows, cols = grid_shape
  if height % rows or width % cols:
    raise ValueError(
        f"image_labels of size {height}x{width} do not split into a {rows}x{cols} " "patch grid"
    )
  pixels = (image_labels == label).astype(jnp.float32)
  pixels = pixels.reshape(batch, rows, height // rows, cols, width // cols)
  return pixels.mean(axis=(2, 4)).reshape(batch, rows * cols)


def patch_labels(image_labels, grid_shape, *, min_fraction=0.25):
  """Per-patch intersection truth [B,P] from pixel labels [B,H,W].

  A patch is labelled intersection when at least ``min_fraction`` of its pixels belong to an
  intersection object (label 1). A plain majority (0.5) marks very few patches on the small
  embedded-world images, whose objects rarely cover half a patch.
  """
  return patch_fractions(image_labels, grid_shape) >= min_fraction


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
