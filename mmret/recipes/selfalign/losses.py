"""SelfAlign's losses: VSE++ on the global embeddings plus concept- and context-level alignment.

Local features (``image_tokens`` [B,P,d], ``text_tokens`` [B,L,d]) are L2-normalised before any
similarity, so every score below is a cosine. The pieces are pure functions of arrays and
:func:`selfalign_loss` their weighted sum (the loss of the ``selfalign`` method). Where a mean runs
over a variable number of valid elements (words, anchors with at least one valid local),
``mean_over_valid`` scales it so that ``pmean`` over devices equals the mean over the global batch.
"""

import jax
import jax.numpy as jnp

from mmret.losses.common import gather, local_labels, mean_over_valid
from mmret.losses.vsepp import vsepp_loss
from mmret.ops import NEG_INF, l2_normalize
from mmret.recipes.selfalign.sinkhorn import sinkhorn


def _text_mask(outputs, batch):
  if "text_mask" in outputs:
    return outputs["text_mask"]
  if "text_mask" in batch:
    return batch["text_mask"]
  raise KeyError("selfalign needs 'text_mask' in the model outputs or the batch")


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
  negative = jnp.where(excluded, NEG_INF, negative)
  k = min(num_negatives, all_locals.shape[0] - n_locals)
  if k > 0:
    hardest, _ = jax.lax.top_k(negative, k)
    negative_lse = jax.nn.logsumexp(hardest, axis=-1, keepdims=True)
  else:  # a global batch of one sample has no negatives
    negative_lse = jnp.full((batch, 1), NEG_INF)
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


# --- The full SelfAlign objective -----------------------------------------------------------------


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
