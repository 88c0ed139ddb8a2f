"""Generalized Contrastive Learning (GCL) and its baselines over image, text and joint embeddings.

Modalities are the three embeddings of each sample: ``z_image`` (i), ``z_text`` (t) and ``z_joint``
(it, image+text). Positive pairs are the six ordered pairs (a, b) of distinct modalities of the same sample.

- ``gcl``: one softmax per (anchor, positive) over all three modalities of all N samples (a 3N-way
  softmax), the anchor's similarity with itself left out.
- ``pairwise``: the six InfoNCE terms a->b, each softmax over modality b only.
- ``cl``: image<->text InfoNCE only: ``mmret.losses.contrastive.clip_loss`` (registered as both
  ``clip`` and ``cl``).

Across devices each device gathers every modality's embeddings; its local rows are the anchors, so
``pmean`` of the returned loss over devices equals the loss on the global batch.
"""

import itertools

import jax
import jax.numpy as jnp

from mmret.losses import chunked
from mmret.losses.common import cross_entropy, gather, local_labels, temperature_scale

MODALITY_KEYS = ("z_image", "z_text", "z_joint")


def _ordered_pairs(n_modalities):
  return list(itertools.permutations(range(n_modalities), 2))


def gcl_loss(
    outputs,
    batch,
    *,
    axis_name=None,
    temperature=None,
    drop_other_positive=False,
    keys=MODALITY_KEYS,
    impl="dense",
    block_size=chunked.DEFAULT_BLOCK_SIZE,
):
  """GCL: mean over local anchors and the six positive pairs of a 3N-way softmax cross-entropy.

  For anchor e_a^j and positive e_b^j the denominator holds e_a^j . e_m^k for every modality m and
  sample k except the anchor itself (m = a, k = j). Read literally it still holds the anchor's other
  same-sample positive (the third modality c of sample j); ``drop_other_positive=True`` removes it.

  Args:
    outputs: model outputs holding ``keys`` (L2-normalised [B,d] each) and, unless ``temperature``
      is given, ``logit_scale``.
    batch: unused.
    axis_name: device axis to gather the other devices' samples over (None: one device).
    temperature: fixed softmax temperature; default: the model's learnable ``logit_scale``.
    drop_other_positive: also exclude the third same-sample modality from each denominator.
    keys: output names of the modalities (default image, text, joint).
    impl: ``"dense"`` builds the [B, M*N] logits; ``"chunked"`` / ``"ring"`` compute the same loss
      ``block_size`` columns at a time (``mmret.losses.chunked``).
    block_size: columns per block of the chunked and ring losses.
  """
  del batch
  chunked.check_impl(impl, block_size)
  local = [outputs[k] for k in keys]
  n_mod, local_batch = len(keys), local[0].shape[0]
  scale = temperature_scale(outputs, temperature)
  if impl != "dense":
    return chunked.gcl_loss(
        local,
        scale,
        drop_other_positive=drop_other_positive,
        impl=impl,
        block_size=block_size,
        axis_name=axis_name,
    )
  everyone = jnp.concatenate([gather(z, axis_name) for z in local], axis=0)  # [M*N, d]
  n_global = everyone.shape[0] // n_mod
  own = local_labels(local_batch, axis_name)  # column of each local row's sample within a block
  rows = jnp.arange(local_batch)

  losses, hits = [], []
  for a, b in _ordered_pairs(n_mod):
    logits = (scale * local[a] @ everyone.T).astype(jnp.float32)  # [B, M*N]
    excluded = jnp.zeros(logits.shape, bool).at[rows, a * n_global + own].set(True)
    if drop_other_positive:
      for c in set(range(n_mod)) - {a, b}:
        excluded = excluded.at[rows, c * n_global + own].set(True)
    logits = jnp.where(excluded, -jnp.inf, logits)
    positive = b * n_global + own
    log_prob = logits[rows, positive] - jax.nn.logsumexp(logits, axis=-1)
    losses.append(-jnp.mean(log_prob))
    # A hit: the best-scoring candidate is one of the anchor's own sample's other modalities.
    best = jnp.argmax(logits, axis=-1)
    hits.append(jnp.mean((best % n_global) == own))
  loss = jnp.mean(jnp.stack(losses))
  return loss, {"acc_same_sample": jnp.mean(jnp.stack(hits)), "scale": scale}


def pairwise_loss(
    outputs,
    batch,
    *,
    axis_name=None,
    temperature=None,
    keys=MODALITY_KEYS,
    impl="dense",
    block_size=chunked.DEFAULT_BLOCK_SIZE,
):
  """Mean of the six pairwise InfoNCE terms a->b, each a softmax over the N samples of modality b.

  Arguments as in :func:`gcl_loss`. Metrics hold each term as ``loss_<a>2<b>`` with the short
  modality names i, t, it.
  """
  del batch
  chunked.check_impl(impl, block_size)
  local = [outputs[k] for k in keys]
  scale = temperature_scale(outputs, temperature)
  metrics = {"scale": scale}
  losses = []
  if impl != "dense":
    terms = chunked.pairwise_losses(
        local, scale, impl=impl, block_size=block_size, axis_name=axis_name
    )
  else:
    gathered = [gather(z, axis_name) for z in local]
    labels = local_labels(local[0].shape[0], axis_name)
    terms = {
        (a, b): cross_entropy(scale * local[a] @ gathered[b].T, labels)
        for a, b in _ordered_pairs(len(keys))
    }
  for a, b in _ordered_pairs(len(keys)):
    term = terms[(a, b)]
    metrics[f"loss_{_short(keys[a])}2{_short(keys[b])}"] = term
    losses.append(term)
  return jnp.mean(jnp.stack(losses)), metrics


def _short(key):
  return {"z_image": "i", "z_text": "t", "z_joint": "it"}.get(key, key)
