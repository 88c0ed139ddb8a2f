"""SelfAlign: VSE++ on global embeddings plus concept- and context-level alignment of locals.

Local features (``image_tokens`` [B,P,d], ``text_tokens`` [B,L,d]) are L2-normalised before any
similarity, so every score below is a cosine. The pieces are pure functions of arrays; ``vsepp`` and
``selfalign`` (their weighted sum) are the registered losses. Where a mean runs over a variable
number of valid elements (words, anchors with at least one valid token), :func:`mean_over_valid`
scales it so that ``pmean`` over devices equals the mean over the global batch.
"""

import jax
import jax.numpy as jnp

from mmret.losses import register
from mmret.losses.common import gather, local_labels
from mmret.methods.sinkhorn import sinkhorn

# Logit given to excluded entries: finite so that rows with nothing left stay NaN-free under grad.
MASKED_LOGIT = -1e9
# The two partial similarities of the final score are weighted 0.5; packing splits it evenly.
CONTEXT_SCORE_WEIGHT = 0.5


def l2_normalize(x, axis=-1, eps=1e-6):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def mean_over_valid(values, valid, axis_name=None):
  """Mean of ``values`` over the ``valid`` entries of the whole batch (all devices).

  On each device returns local_sum * n_devices / global_count, so that ``pmean`` over the devices is
  the global mean (and its gradient the single-device gradient). Zero when nothing is valid.
  """
  valid = valid.astype(jnp.float32)
  total = jnp.sum(values * valid)
  count = jnp.sum(valid)
  n_devices = 1.0
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
    n_devices = jax.lax.psum(1.0, axis_name)
  return total * n_devices / jnp.maximum(count, 1.0)


def _text_mask(outputs, batch):
  if "text_mask" in outputs:
    return outputs["text_mask"]
  if "text_mask" in batch:
    return batch["text_mask"]
  raise KeyError("selfalign needs 'text_mask' in the model outputs or the batch")


# --- VSE++ ----------------------------------------------------------------------------------------


def _hinge_per_anchor(scores, own, margin, max_violation):
  """scores [B,N] of local anchors vs all candidates; own [B] column of each anchor's positive."""
  rows = jnp.arange(scores.shape[0])
  positive = scores[rows, own]
  is_positive = jnp.zeros(scores.shape, bool).at[rows, own].set(True)
  cost = jnp.where(is_positive, 0.0, jax.nn.relu(margin + scores - positive[:, None]))
  return jnp.max(cost, axis=-1) if max_violation else jnp.sum(cost, axis=-1)


@register("vsepp")
def vsepp_loss(
    outputs, batch, *, axis_name=None, margin=0.2, max_violation=True, a="z_image", b="z_text"
):
  """VSE++ hinge loss, both directions, negatives = all other samples across devices.

  Per anchor: [margin + s(anchor, negative) - s(anchor, positive)]_+ on the hardest negative
  (``max_violation=True``) or summed over all negatives (``False``, the VSE0 variant). The loss is
  the mean over anchors of a->b plus the mean over anchors of b->a (VSE++'s sum divided by N).
  """
  del batch
  za, zb = outputs[a], outputs[b]
  own = local_labels(za.shape[0], axis_name)
  scores_ab = za @ gather(zb, axis_name).T
  scores_ba = zb @ gather(za, axis_name).T
  loss_ab = jnp.mean(_hinge_per_anchor(scores_ab, own, margin, max_violation))
  loss_ba = jnp.mean(_hinge_per_anchor(scores_ba, own, margin, max_violation))
  accuracy = jnp.mean(jnp.argmax(scores_ab, axis=-1) == own)
  return loss_ab + loss_ba, {"loss_i2t": loss_ab, "loss_t2i": loss_ba, "acc_i2t": accuracy}


# --- Concept-level alignment ----------------------------------------------------------------------


def concept_alignment_loss(
    image_tokens,
    text_tokens,
    text_mask,
    prototypes,
    *,
    epsilon=0.05,
    sinkhorn_iterations=3,
    temperature=0.1,
    axis_name=None,
):
  """Words predict the prototype assignment of their best-matching region of the same sample.

  Regions get balanced soft assignments to the (re-normalised) prototypes by Sinkhorn-Knopp over all
  regions of the global batch (no gradient). Each valid word is matched to its most similar region
  (no gradient) and scored by the cross-entropy between that region's assignment and the softmax of
  the word's prototype similarities at ``temperature``; the loss is the mean over valid words.

  Args:
    image_tokens: [B,P,d] region features. text_tokens: [B,L,d] word features.
    text_mask: [B,L] True for real words. prototypes: [K,d].
    epsilon, sinkhorn_iterations: Sinkhorn regularisation and rounds.
    temperature: softmax temperature of the word-prototype scores.
    axis_name: device axis (Sinkhorn balances over all devices' regions).
  """
  protos = l2_normalize(prototypes)
  regions, words = l2_normalize(image_tokens), l2_normalize(text_tokens)
  batch, n_regions, _ = regions.shape
  region_scores = (regions @ protos.T).reshape(batch * n_regions, -1)
  assignment = sinkhorn(
      region_scores, epsilon=epsilon, iterations=sinkhorn_iterations, axis_name=axis_name
  ).reshape(batch, n_regions, -1)
  word_region = jax.lax.stop_gradient(jnp.einsum("bld,bpd->blp", words, regions))
  best_region = jnp.argmax(word_region, axis=-1)  # [B,L]
  target = jnp.take_along_axis(assignment, best_region[..., None], axis=1)  # [B,L,K]
  log_prob = jax.nn.log_softmax((words @ protos.T).astype(jnp.float32) / temperature, axis=-1)
  per_word = -jnp.sum(target * log_prob, axis=-1)
  return mean_over_valid(per_word, text_mask, axis_name)


# --- Context-level alignment ----------------------------------------------------------------------


def context_nce(global_a, locals_b, mask_b, *, temperature=0.7, num_negatives=512, axis_name=None):
  """DIM-style NCE of one modality's global vectors against the other modality's local features.

  A global vector g scores a local feature l by the cosine g.l / temperature. For anchor i, every
  valid local of its own sample is a positive; the negatives are the valid locals of all other
  samples (gathered across devices), of which the ``num_negatives`` highest-scoring are kept (capped
  by how many exist). Each positive p gives -log(e^{s_p} / (e^{s_p} + sum_hardest e^{s_n})); the
  anchor's loss is the mean over its positives and the result the mean over anchors with at least
  one valid local.

  Args:
    global_a: [B,d] global embeddings. locals_b: [B,T,d] local features. mask_b: [B,T] valid locals.
  """
  batch, n_locals, dim = locals_b.shape
  g = l2_normalize(global_a)
  locals_b = l2_normalize(locals_b)
  positive = jnp.einsum("bd,btd->bt", g, locals_b) / temperature  # [B,T]
  all_locals = gather(locals_b, axis_name).reshape(-1, dim)
  all_mask = gather(mask_b, axis_name).reshape(-1)
  negative = g @ all_locals.T / temperature  # [B, N*T]
  sample_of_local = jnp.arange(all_locals.shape[0]) // n_locals
  own = local_labels(batch, axis_name)
  excluded = (sample_of_local[None, :] == own[:, None]) | ~all_mask[None, :]
  negative = jnp.where(excluded, MASKED_LOGIT, negative)
  k = min(num_negatives, all_locals.shape[0] - n_locals)
  if k > 0:
    hardest, _ = jax.lax.top_k(negative, k)
    negative_lse = jax.nn.logsumexp(hardest, axis=-1, keepdims=True)
  else:  # a global batch of one sample has no negatives
    negative_lse = jnp.full((batch, 1), MASKED_LOGIT)
  per_positive = -(positive - jnp.logaddexp(positive, negative_lse))
  mask_b = mask_b.astype(jnp.float32)
  count = jnp.sum(mask_b, axis=-1)
  per_anchor = jnp.sum(per_positive * mask_b, axis=-1) / jnp.maximum(count, 1.0)
  return mean_over_valid(per_anchor, count > 0, axis_name)


def context_alignment_loss(
    z_image,
    z_text,
    image_tokens,
    text_tokens,
    text_mask,
    *,
    temperature=0.7,
    num_negatives=512,
    axis_name=None,
):
  """Mean of image-global vs text-locals and text-global vs image-locals :func:`context_nce`."""
  image_mask = jnp.ones(image_tokens.shape[:2], bool)
  kw = dict(temperature=temperature, num_negatives=num_negatives, axis_name=axis_name)
  image_to_words = context_nce(z_image, text_tokens, text_mask, **kw)
  text_to_regions = context_nce(z_text, image_tokens, image_mask, **kw)
  return 0.5 * (image_to_words + text_to_regions)


# --- Final similarity and retrieval vectors -------------------------------------------------------


def _masked_softmax(logits, mask):
  logits = jnp.where(mask, logits, MASKED_LOGIT)
  return jax.nn.softmax(logits, axis=-1) * mask


def context_vector(global_vec, locals_, mask=None, *, temperature=0.1):
  """Context of a sample: its locals pooled by attention gated by its own global vector.

  Weights = softmax over valid locals of cos(global, local) / temperature; the pooled vector is
  L2-normalised. Shapes: global [B,d], locals [B,T,d], mask [B,T] -> [B,d].
  """
  if mask is None:
    mask = jnp.ones(locals_.shape[:2], bool)
  locals_ = l2_normalize(locals_)
  gate = jnp.einsum("bd,btd->bt", l2_normalize(global_vec), locals_) / temperature
  weights = _masked_softmax(gate, mask)
  return l2_normalize(jnp.einsum("bt,btd->bd", weights, locals_))


def mean_local(locals_, mask=None):
  """L2-normalised mean of a sample's valid (L2-normalised) locals: [B,T,d] -> [B,d]."""
  if mask is None:
    mask = jnp.ones(locals_.shape[:2], bool)
  mask = mask.astype(jnp.float32)
  total = jnp.einsum("bt,btd->bd", mask, l2_normalize(locals_))
  return l2_normalize(total / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0))


def selfalign_similarity(
    z_image, image_tokens, z_text, text_tokens, text_mask, *, pooling_temperature=0.1
):
  """Final score matrix [images, texts]: g_i.g_t + 0.5 (ctx_i.mean_t + mean_i.ctx_t)."""
  ctx_i = context_vector(z_image, image_tokens, temperature=pooling_temperature)
  ctx_t = context_vector(z_text, text_tokens, text_mask, temperature=pooling_temperature)
  mean_i, mean_t = mean_local(image_tokens), mean_local(text_tokens, text_mask)
  return z_image @ z_text.T + CONTEXT_SCORE_WEIGHT * (ctx_i @ mean_t.T + mean_i @ ctx_t.T)


def image_retrieval_vector(z_image, image_tokens, *, pooling_temperature=0.1):
  """[g_i, c*ctx_i, c*mean_i], c = sqrt(0.5): its dot with the text vector is the final score."""
  c = CONTEXT_SCORE_WEIGHT**0.5
  ctx = context_vector(z_image, image_tokens, temperature=pooling_temperature)
  return jnp.concatenate([z_image, c * ctx, c * mean_local(image_tokens)], axis=-1)


def text_retrieval_vector(z_text, text_tokens, text_mask, *, pooling_temperature=0.1):
  """[g_t, c*mean_t, c*ctx_t] with c = sqrt(0.5), the partner of :func:`image_retrieval_vector`."""
  c = CONTEXT_SCORE_WEIGHT**0.5
  ctx = context_vector(z_text, text_tokens, text_mask, temperature=pooling_temperature)
  return jnp.concatenate([z_text, c * mean_local(text_tokens, text_mask), c * ctx], axis=-1)


# --- The full SelfAlign objective -----------------------------------------------------------------


@register("selfalign")
def selfalign_loss(
    outputs,
    batch,
    *,
    axis_name=None,
    margin=0.2,
    max_violation=True,
    concept_weight=1.0,
    context_weight=1.0,
    prototypes=None,
    epsilon=0.05,
    sinkhorn_iterations=3,
    concept_temperature=0.1,
    context_temperature=0.7,
    num_negatives=512,
):
  """VSE++ + concept_weight * concept loss + context_weight * context loss.

  Reads ``z_image``, ``z_text``, ``image_tokens``, ``text_tokens``, ``text_mask`` (outputs, else
  batch) and the prototypes [K,d] (the ``prototypes`` hparam, else ``outputs['prototypes']``; only
  needed when ``concept_weight`` > 0).
  """
  loss, metrics = vsepp_loss(
      outputs, batch, axis_name=axis_name, margin=margin, max_violation=max_violation
  )
  metrics = dict(metrics, loss_vsepp=loss)
  text_mask = _text_mask(outputs, batch)
  if concept_weight:
    if prototypes is None:
      if "prototypes" not in outputs:
        raise KeyError(
            "selfalign concept loss needs prototypes: pass prototypes= or return "
            "'prototypes' from the model"
        )
      prototypes = outputs["prototypes"]
    concept = concept_alignment_loss(
        outputs["image_tokens"],
        outputs["text_tokens"],
        text_mask,
        prototypes,
        epsilon=epsilon,
        sinkhorn_iterations=sinkhorn_iterations,
        temperature=concept_temperature,
        axis_name=axis_name,
    )
    loss = loss + concept_weight * concept
    metrics["loss_concept"] = concept
  if context_weight:
    context = context_alignment_loss(
        outputs["z_image"],
        outputs["z_text"],
        outputs["image_tokens"],
        outputs["text_tokens"],
        text_mask,
        temperature=context_temperature,
        num_negatives=num_negatives,
        axis_name=axis_name,
    )
    loss = loss + context_weight * context
    metrics["loss_context"] = context
  return loss, metrics
