"""SOLAR mask quality: predicted intersection masks vs the embedded world's ground truth.

Evaluator type ``solar_masks`` (records with ``image``, ``caption``, ``caption_tags`` and
``image_labels``, e.g. the world's ``train`` split)::

  config.evals.masks = dict(type='solar_masks', dataset='mmret_world/tiny', split='train', every=0)

The model's adapted tokens are scored against the partner's unimodal global (patches vs z_text,
words vs z_image, as in training); one density-crossing threshold per modality is fitted on the
evaluated pairs (own partner vs every other pair's). Metrics (percent): ``{text,patch}_mask/
{iou,precision,recall}`` micro-averaged over the examples, the predicted and true mask fractions,
and the thresholds (cosines). Files in the evaluation's directory: ``overlays.png`` (per row: the
image, the true intersection patches in green, the predicted ones in red) and ``text_masks.jsonl``
(per caption: its words, the true and the predicted intersection words).
"""

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmret.data import pipeline, preprocess
from mmret.evals.registry import register
from mmret.losses import solar as solar_losses
from mmret.methods import solar

OVERLAY_SCALE = 4  # pixels per image pixel in the overlay PNG
TRUE_COLOUR = (0, 200, 0)
PREDICTED_COLOUR = (230, 0, 0)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_examples(records, input_cfg, num_examples: int) -> dict:
  """The first ``num_examples`` records as arrays: raw uint8 images, normalised images, token
  ids/mask/tags, pixel labels, and the caption words with their tags."""
  tokenizer = pipeline.tokenizer_for(input_cfg)
  size, length = int(input_cfg.image_size), int(input_cfg.max_text_len)
  columns = {
      k: []
      for k in (
          "raw",
          "image",
          "text_ids",
          "text_mask",
          "text_intersection",
          "image_labels",
          "words",
          "word_tags",
          "id",
      )
  }
  for i in range(min(num_examples, len(records))):
    record = records[i]
    where = f"record #{i} (id {record.get('id', '?')!r})"
    missing = [k for k in ("image", "caption", "caption_tags", "image_labels") if k not in record]
    if missing:
      raise KeyError(
          f"{where} has no {missing}: solar_masks needs a split with ground-truth "
          f"masks (fields: {sorted(record)})"
      )
    raw = preprocess.crop_resize(preprocess.decode_image(record["image"], where=where), None, size)
    labels = preprocess.crop_resize(
        np.asarray(record["image_labels"], np.uint8), None, size, nearest=True
    )
    caption = _text(record["caption"])
    tags = np.asarray(record["caption_tags"]).reshape(-1)
    ids, mask, token_tags = tokenizer.encode_with_word_tags(caption, tags, length)
    columns["raw"].append(raw)
    columns["image"].append(preprocess.normalize(raw, input_cfg.mean, input_cfg.std))
    columns["text_ids"].append(ids)
    columns["text_mask"].append(mask)
    columns["text_intersection"].append(token_tags)
    columns["image_labels"].append(labels)
    columns["words"].append(caption.split())
    columns["word_tags"].append(tags.tolist())
    columns["id"].append(_text(record.get("id", i)))
  if not columns["id"]:
    raise ValueError("solar_masks: the split holds no records")
  return {
      k: (np.stack(v) if k not in ("words", "word_tags", "id") else v) for k, v in columns.items()
  }


def _on_one_device(params):
  """The local copy of (replicated) parameters, on the first local device."""
  local = lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x
  return jax.device_put(jax.tree.map(local, params), jax.local_devices()[0])


def model_outputs(predict_fn, params, examples, batch_size: int) -> dict:
  """Tokens and unimodal globals of every example, in batches padded to ``batch_size``."""
  keys = ("image_tokens", "text_tokens", "z_image", "z_text")
  predict = jax.jit(lambda p, b: {k: predict_fn(p, b)[k] for k in keys})
  params = _on_one_device(params)
  total = len(examples["id"])
  parts = {k: [] for k in keys}
  for start in range(0, total, batch_size):
    batch = {k: examples[k][start : start + batch_size] for k in ("image", "text_ids", "text_mask")}
    rows = len(batch["image"])
    batch = {
        k: np.concatenate([v, np.repeat(v[-1:], batch_size - rows, 0)]) for k, v in batch.items()
    }
    out = jax.device_get(predict(params, batch))
    for k in keys:
      parts[k].append(out[k][:rows])
  return {k: np.concatenate(v) for k, v in parts.items()}


def predicted_masks(outputs, text_mask, *, min_variance=1e-6) -> dict:
  """Hard masks [N,P] / [N,L], scores and thresholds fitted over all given pairs."""
  image_tokens, text_tokens = jnp.asarray(outputs["image_tokens"]), jnp.asarray(
      outputs["text_tokens"]
  )
  z_image, z_text = jnp.asarray(outputs["z_image"]), jnp.asarray(outputs["z_text"])
  patch_valid = jnp.ones(image_tokens.shape[:2], bool)
  image_threshold = solar.intersection_threshold(
      image_tokens, patch_valid, z_text, min_variance=min_variance
  )
  text_threshold = solar.intersection_threshold(
      text_tokens, text_mask, z_image, min_variance=min_variance
  )
  image_scores = solar.token_scores(image_tokens, z_text)
  text_scores = solar.token_scores(text_tokens, z_image)
  return {
      "image_mask": np.asarray(solar.intersection_mask(image_scores, image_threshold)) > 0.5,
      "text_mask": np.asarray(solar.intersection_mask(text_scores, text_threshold, text_mask))
      > 0.5,
      "image_threshold": float(image_threshold),
      "text_threshold": float(text_threshold),
  }


def overlay_rows(raw_images, true_patches, predicted_patches, grid) -> np.ndarray:
  """One uint8 picture: per example [image | true patches (green) | predicted (red)]."""
  rows, cols = grid
  blocks = []
  for image, truth, predicted in zip(raw_images, true_patches, predicted_patches):
    size = image.shape[0]
    block = np.ones((size // rows, size // cols))
    per_pixel = lambda mask: np.kron(mask.reshape(rows, cols), block)

    def tinted(mask, colour):
      alpha = 0.55 * per_pixel(mask)[..., None]
      return (image * (1 - alpha) + np.asarray(colour) * alpha).astype(np.uint8)

    gap = np.full((size, 2, 3), 255, np.uint8)
    blocks.append(
        np.concatenate(
            [image, gap, tinted(truth, TRUE_COLOUR), gap, tinted(predicted, PREDICTED_COLOUR)],
            axis=1,
        )
    )
  separator = np.full((2, blocks[0].shape[1], 3), 255, np.uint8)
  picture = np.concatenate([x for block in blocks for x in (block, separator)][:-1], axis=0)
  return np.kron(picture, np.ones((OVERLAY_SCALE, OVERLAY_SCALE, 1), np.uint8))


def _word_masks(tokenizer, words, token_mask_row):
  """Per caption word: predicted when any of its tokens is (tokens follow the start token)."""
  out, position = [], 1
  for word in words:
    count = len(tokenizer.word_ids(word))
    out.append(bool(np.any(token_mask_row[position : position + count])))
    position += count
  return out


def write_files(workdir, examples, masks, true_patches, grid, num_overlays, input_cfg):
  os.makedirs(workdir, exist_ok=True)
  shown = slice(0, min(num_overlays, len(examples["id"])))
  picture = overlay_rows(
      examples["raw"][shown], true_patches[shown], masks["image_mask"][shown], grid
  )
  Image.fromarray(picture).save(os.path.join(workdir, "overlays.png"))
  tokenizer = pipeline.tokenizer_for(input_cfg)
  with open(os.path.join(workdir, "text_masks.jsonl"), "w") as f:
    for i in range(shown.stop):
      words = examples["words"][i]
      f.write(
          json.dumps(
              {
                  "id": examples["id"][i],
                  "words": words,
                  "true": [
                      w
                      for w, t in zip(words, examples["word_tags"][i])
                      if t == solar_losses.INTERSECTION_LABEL
                  ],
                  "predicted": [
                      w
                      for w, p in zip(words, _word_masks(tokenizer, words, masks["text_mask"][i]))
                      if p
                  ],
              }
          )
          + "\n"
      )


@register("solar_masks", data="records")
def evaluate_solar_masks(
    predict_fn,
    *,
    data,
    input_cfg,
    workdir: Optional[str] = None,
    params=None,
    batch_size: int = 64,
    num_examples: int = 256,
    num_overlays: int = 8,
    patch_label_fraction: float = 0.25,
    min_variance: float = 1e-6,
) -> dict:
  """Mask quality on the first ``num_examples`` records; overlays of the first ``num_overlays``.

  A patch is true intersection when at least ``patch_label_fraction`` of its pixels belong to an
  intersection object (``mmret.losses.solar.patch_labels``).
  """
  examples = load_examples(data, input_cfg, num_examples)
  outputs = model_outputs(predict_fn, params, examples, batch_size)
  masks = predicted_masks(outputs, examples["text_mask"], min_variance=min_variance)
  grid = solar_losses.patch_grid(outputs["image_tokens"].shape[1])
  true_patches = np.asarray(
      solar_losses.patch_labels(
          jnp.asarray(examples["image_labels"]), grid, min_fraction=patch_label_fraction
      )
  )
  true_tokens = examples["text_intersection"] == solar_losses.INTERSECTION_LABEL
  text_mask = examples["text_mask"]
  metrics = {
      "image_threshold": masks["image_threshold"],
      "text_threshold": masks["text_threshold"],
      "patch_mask/predicted_fraction": 100.0 * masks["image_mask"].mean(),
      "patch_mask/true_fraction": 100.0 * true_patches.mean(),
      "text_mask/predicted_fraction": 100.0 * masks["text_mask"][text_mask].mean(),
      "text_mask/true_fraction": 100.0 * true_tokens[text_mask].mean(),
  }
  for name, predicted, truth, valid in (
      ("patch_mask", masks["image_mask"], true_patches, None),
      ("text_mask", masks["text_mask"], true_tokens, text_mask),
  ):
    quality = solar_losses.mask_quality(
        jnp.asarray(predicted), jnp.asarray(truth), None if valid is None else jnp.asarray(valid)
    )
    metrics.update({f"{name}/{k}": 100.0 * float(v) for k, v in quality.items()})
  if workdir is not None and jax.process_index() == 0:
    write_files(workdir, examples, masks, true_patches, grid, num_overlays, input_cfg)
  return metrics
