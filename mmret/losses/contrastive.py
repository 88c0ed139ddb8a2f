"""CLIP-style InfoNCE between the image and text embeddings."""

import jax.numpy as jnp

from mmret.losses import register
from mmret.losses.common import cross_entropy, gather, local_labels, temperature_scale


@register("clip")
def clip_loss(outputs, batch, *, axis_name=None, temperature=None, a="z_image", b="z_text"):
  """Symmetric InfoNCE: each local row of ``a`` against all of ``b`` gathered across devices, and back.

  Returns the mean over this device's rows; ``pmean`` over devices gives the global-batch loss.
  ``temperature`` fixes 1/scale; by default the model's learnable ``logit_scale`` is used.
  """
  del batch
  za, zb = outputs[a], outputs[b]
  scale = temperature_scale(outputs, temperature)
  labels = local_labels(za.shape[0], axis_name)
  logits_ab = scale * za @ gather(zb, axis_name).T
  logits_ba = scale * zb @ gather(za, axis_name).T
  loss_ab = cross_entropy(logits_ab, labels)
  loss_ba = cross_entropy(logits_ba, labels)
  loss = 0.5 * (loss_ab + loss_ba)
  accuracy = jnp.mean(jnp.argmax(logits_ab, axis=-1) == labels)
  return loss, {"loss_i2t": loss_ab, "loss_t2i": loss_ba, "acc_i2t": accuracy, "scale": scale}
