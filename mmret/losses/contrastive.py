"""InfoNCE: the CLIP loss between two embeddings, and its multi-positive form over masks."""

import jax
import jax.numpy as jnp

from mmret.losses import chunked
from mmret.losses.common import cross_entropy, gather, local_labels, temperature_scale
from mmret.ops import NEG_INF


def clip_loss(
    outputs,
    batch,
    *,
    axis_name=None,
    temperature=None,
    a="z_image",
    b="z_text",
    impl="dense",
    block_size=chunked.DEFAULT_BLOCK_SIZE,
):
  """Symmetric InfoNCE: each local row of ``a`` against all of ``b`` gathered across devices, and back.

  Returns the mean over this device's rows; ``pmean`` over devices gives the global-batch loss.
  ``temperature`` fixes 1/scale; by default the model's learnable ``logit_scale`` is used.
  ``impl``: ``"dense"`` builds the [B, N] logits; ``"chunked"`` / ``"ring"`` compute the same loss
  ``block_size`` columns at a time (``mmret.losses.chunked``).
  """
  del batch
  chunked.check_impl(impl, block_size)
  za, zb = outputs[a], outputs[b]
  scale = temperature_scale(outputs, temperature)
  if impl != "dense":
    return chunked.clip_loss(za, zb, scale, impl=impl, block_size=block_size, axis_name=axis_name)
  labels = local_labels(za.shape[0], axis_name)
  logits_ab = scale * za @ gather(zb, axis_name).T
  logits_ba = scale * zb @ gather(za, axis_name).T
  loss_ab = cross_entropy(logits_ab, labels)
  loss_ba = cross_entropy(logits_ba, labels)
  loss = 0.5 * (loss_ab + loss_ba)
  accuracy = jnp.mean(jnp.argmax(logits_ab, axis=-1) == labels)
  return loss, {"loss_i2t": loss_ab, "loss_t2i": loss_ba, "acc_i2t": accuracy, "scale": scale}


def multi_positive_infonce(anchors, candidates, positive_mask, negative_mask, *, temperature=0.05):
  """Per anchor: -log(sum_{P} e^{f.g/T} / sum_{P u N} e^{f.g/T}).

  Args:
    anchors: [A,d]. candidates: [C,d].
    positive_mask, negative_mask: [A,C] bool, P(i) and N(i) (an entry in both counts once).
  Returns (loss [A], valid [A]); an anchor without a positive has loss 0 and valid False.
  ``mmret.losses.chunked.multi_positive_infonce`` computes the same with the masks given per block.
  """
  logits = (anchors @ candidates.T).astype(jnp.float32) / temperature
  positive_lse = jax.nn.logsumexp(jnp.where(positive_mask, logits, NEG_INF), axis=-1)
  all_lse = jax.nn.logsumexp(jnp.where(positive_mask | negative_mask, logits, NEG_INF), -1)
  valid = jnp.any(positive_mask, axis=-1)
  return jnp.where(valid, all_lse - positive_lse, 0.0), valid
