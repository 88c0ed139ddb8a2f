"""SOLAR stage 2's views: per sample, a positive that drops part of the intersection (the other
modality still carries it) and a hard negative that drops part of the difference (information only
one modality had is lost), over text tokens and image segments.

Every random choice is drawn from per-example keys (``mmret.methods.example_keys``), so the views
of a sample do not depend on how the batch is split over devices.
"""

import jax
import jax.numpy as jnp

from mmret.recipes.solar.segments import segment_scores

NEGATIVE_GROUPINGS = ("ratio", "one", "run")


def _runs(units):
  """Maximal runs of consecutive True entries: (run number per unit, 1-based, 0 off-run [B,U],
  number of runs [B])."""
  previous = jnp.pad(units[:, :-1], ((0, 0), (1, 0)))
  starts = units & ~previous
  return jnp.cumsum(starts, -1) * units, jnp.sum(starts, -1)


def masked_views(
    keys,
    intersection,
    valid,
    *,
    mask_ratio=0.3,
    negative_ratio=1.0,
    negative_grouping="ratio",
    protected=None,
):
  """Keep-masks of a positive and a hard-negative view over units (tokens or segments) [B,U].

  Positive: drops a random ``mask_ratio`` of the sample's intersection units (rounded, at least one,
  always keeping one; none when it has fewer than two). Hard negative: drops difference units
  (valid, not intersection), grouped by ``negative_grouping``: 'ratio' drops a random
  ``negative_ratio`` of them (at least one when any exist; 1.0 drops all), 'one' a single random
  one (e.g. one image segment: one object), 'run' one random maximal run of consecutive difference
  units (e.g. a phrase of the caption: one fact). ``protected`` units are never dropped.
  Per-sample randomness comes from ``keys`` [B].

  Returns dict with ``positive_keep``, ``negative_keep`` [B,U] bool and ``has_positive``,
  ``has_negative`` [B] (whether the view differs from the original).
  """
  if negative_grouping not in NEGATIVE_GROUPINGS:
    raise ValueError(
        f"unknown negative grouping {negative_grouping!r}; expected one of {NEGATIVE_GROUPINGS}"
    )
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
  if negative_grouping == "run":
    run, n_runs = _runs(difference)
    pick = jax.vmap(lambda k, n: jax.random.randint(k, (), 1, jnp.maximum(n, 1) + 1))(
        key_neg, n_runs
    )
    drop_neg = (run == pick[:, None]) & difference
  else:
    ratio = negative_ratio if negative_grouping == "ratio" else 0.0
    n_neg = jnp.where(
        n_difference >= 1, jnp.clip(jnp.round(ratio * n_difference), 1, n_difference), 0
    )
    drop_neg = drop_random(key_neg, difference, n_neg.astype(jnp.int32))
  drop_pos = drop_random(key_pos, shared, n_pos.astype(jnp.int32))
  return {
      "positive_keep": valid & ~drop_pos,
      "negative_keep": valid & ~drop_neg,
      "has_positive": n_pos > 0,
      "has_negative": jnp.any(drop_neg, -1),
  }


def image_views(
    keys,
    patch_scores,
    segment_ids,
    num_segments,
    threshold,
    *,
    mask_ratio=0.3,
    negative_ratio=1.0,
    negative_grouping="ratio",
):
  """Patch keep-masks of the image views: segments whose mean score exceeds ``threshold`` are the
  intersection; :func:`masked_views` picks segments to drop and every patch follows its segment."""
  scores, non_empty = segment_scores(patch_scores, segment_ids, num_segments)
  views = masked_views(
      keys,
      scores > threshold,
      non_empty,
      mask_ratio=mask_ratio,
      negative_ratio=negative_ratio,
      negative_grouping=negative_grouping,
  )
  to_patches = lambda keep: jnp.take_along_axis(keep, segment_ids, axis=1)
  return dict(
      views,
      positive_keep=to_patches(views["positive_keep"]),
      negative_keep=to_patches(views["negative_keep"]),
  )


VIEW_MODES = ("both", "text", "image", "random")
# A modality's hard negative drops 'ratio' (``negative_ratio`` of its difference units) or one
# 'fact': in text one run of consecutive difference tokens, in the image one difference segment.
NEGATIVE_FACT_GROUPING = {"text": "run", "image": "one"}
NEGATIVES = ("ratio", "fact")


def _grouping(choice, modality):
  if choice not in NEGATIVES:
    raise ValueError(f"{modality}_negative must be one of {NEGATIVES}, got {choice!r}")
  return "ratio" if choice == "ratio" else NEGATIVE_FACT_GROUPING[modality]


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
    keys,
    text_intersection,
    text_mask,
    patch_scores,
    image_threshold,
    segment_ids,
    num_segments,
    *,
    mode="random",
    mask_ratio=0.3,
    negative_ratio=1.0,
    text_negative="ratio",
    image_negative="ratio",
    text_protected=None,
):
  """Text and image keep-masks for each sample's positive and hard-negative views.

  ``text_intersection`` [B,L] marks the text tokens of the intersection; image segments are the
  intersection when their mean patch score exceeds ``image_threshold``. A modality not chosen by
  ``mode`` for a sample keeps all its units in both views. ``keys`` [B]: one key per sample.
  ``text_negative`` / ``image_negative``: how each modality's hard negative groups the difference
  units it drops (:data:`NEGATIVE_FACT_GROUPING`: 'ratio' or 'fact', one phrase / one segment).
  Returns dict: ``{text,image}_{positive,negative}_keep`` and ``has_positive``/``has_negative`` [B]
  (whether some chosen modality actually changed).
  """
  stream = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
  text = masked_views(
      stream(0),
      text_intersection,
      text_mask,
      mask_ratio=mask_ratio,
      negative_ratio=negative_ratio,
      negative_grouping=_grouping(text_negative, "text"),
      protected=text_protected,
  )
  image = image_views(
      stream(1),
      patch_scores,
      segment_ids,
      num_segments,
      image_threshold,
      mask_ratio=mask_ratio,
      negative_ratio=negative_ratio,
      negative_grouping=_grouping(image_negative, "image"),
  )
  use_text, use_image = masked_modalities(stream(2), mode)
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
