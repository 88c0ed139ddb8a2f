"""VSE++: a hinge on the hardest in-batch negative (or the sum over negatives), both directions."""

import jax
import jax.numpy as jnp

from mmret.losses import chunked
from mmret.losses.common import gather, local_labels


def _hinge_per_anchor(scores, own, margin, max_violation):
  """scores [B,N] of local anchors vs all candidates; own [B] column of each anchor's positive."""
  rows = jnp.arange(scores.shape[0])
  positive = scores[rows, own]
  is_positive = jnp.zeros(scores.shape, bool).at[rows, own].set(True)
  cost = jnp.where(is_positive, 0.0, jax.nn.relu(margin + scores - positive[:, None]))
  return jnp.max(cost, axis=-1) if max_violation else jnp.sum(cost, axis=-1)


def vsepp_loss(
    outputs,
    batch,
    *,
    axis_name=None,
    margin=0.2,
    max_violation=True,
    a="z_image",
    b="z_text",
    impl="dense",
    block_size=chunked.DEFAULT_BLOCK_SIZE,
):
  """VSE++ hinge loss, both directions, negatives = all other samples across devices.

  Per anchor: [margin + s(anchor, negative) - s(anchor, positive)]_+ on the hardest negative
  (``max_violation=True``) or summed over all negatives (``False``, the VSE0 variant). The loss is
  the mean over anchors of a->b plus the mean over anchors of b->a (VSE++'s sum divided by N).
  ``impl``: ``"dense"`` builds the [B, N] scores; ``"chunked"`` / ``"ring"`` keep a running hardest
  negative (or hinge sum) over ``block_size`` columns at a time (``mmret.losses.chunked``).
  """
  del batch
  chunked.check_impl(impl, block_size)
  za, zb = outputs[a], outputs[b]
  if impl != "dense":
    return chunked.vsepp_loss(
        za,
        zb,
        margin=margin,
        max_violation=max_violation,
        impl=impl,
        block_size=block_size,
        axis_name=axis_name,
    )
  own = local_labels(za.shape[0], axis_name)
  scores_ab = za @ gather(zb, axis_name).T
  scores_ba = zb @ gather(za, axis_name).T
  loss_ab = jnp.mean(_hinge_per_anchor(scores_ab, own, margin, max_violation))
  loss_ba = jnp.mean(_hinge_per_anchor(scores_ba, own, margin, max_violation))
  accuracy = jnp.mean(jnp.argmax(scores_ab, axis=-1) == own)
  return loss_ab + loss_ba, {"loss_i2t": loss_ab, "loss_t2i": loss_ba, "acc_i2t": accuracy}
