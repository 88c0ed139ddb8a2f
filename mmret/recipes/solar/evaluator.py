"""SOLAR mask quality: predicted intersection masks vs the embedded world's ground truth.

Evaluator type ``solar_masks`` (records with ``image``, ``caption``, ``caption_tags`` and
``image_labels``, e.g. the world's held-out ``val`` split; on the ``train`` split a model that has
memorised its pairs scores their text-only words like intersection words)::

  config.evals.masks = dict(type='solar_masks', dataset='mmret_world/tiny', split='val', every=0)

The model's adapted tokens and unimodal globals come from the shared embedding pass
(``mmret.evals.embed.item_outputs``); masks are fitted by ``masks.fit_masks``, as in training, with
one threshold per modality over the evaluated pairs (own partner vs every other pair's; estimator
``threshold``: 'pairs' or 'mixture'; token ``score``: 'cosine' or 'contrast'). Metrics (percent): ``{text,patch}_mask/{iou,precision,recall}``
micro-averaged over the examples, the predicted and true mask fractions, the thresholds (cosines),
the AUC of the scores of intersection units against all other units (``{text,patch}_mask/auc``:
50 = the scores carry no information, whatever the threshold), the AUC of intersection units
against the difference units alone (``{text,patch}_mask/auc_vs_difference``: text-only tokens,
image-only patches; the separation stage 2's positives and hard negatives rely on, template words
and background left out) and the mean score per kind of unit
(``text_scores/{template,intersection,text_only}``, ``patch_scores/{background,intersection,
image_only}``). Files in the evaluation's directory: ``overlays.png`` (per row: the image, the true
intersection patches in green, the predicted ones in red; a legend under the rows says so),
``scores.png`` (per modality, the histogram of each kind's scores and the threshold) and
``text_masks.jsonl`` (per caption: its words, the true and the predicted intersection words).
"""

import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from mmret.data import pipeline, preprocess
from mmret.evals import embed
from mmret.evals.evaluator import RECORDS, Evaluator
from mmret.recipes.solar import masks as masks_lib

OVERLAY_SCALE = 4  # pixels per image pixel in the overlay PNG
TRUE_COLOUR = (0, 200, 0)
PREDICTED_COLOUR = (230, 0, 0)
PASS_OUTPUTS = ("image_tokens", "text_tokens", "text_mask", "z_image", "z_text")
# Kinds of units, indexed by the ground-truth tag: text tokens (caption_tags) and patches.
TEXT_KINDS = ("template", "intersection", "text_only")
PATCH_KINDS = ("background", "intersection", "image_only")
KIND_COLOURS = ((150, 150, 150), (0, 170, 0), (210, 60, 0))
DIFFERENCE_KIND = 2  # text-only tokens, image-only patches: what one modality alone carries
# The legend under the overlays: (text, swatch colour or None), one row each.
OVERLAY_LEGEND = (
    ("per row: image | ground truth | prediction", None),
    ("green: true intersection patches (in image and caption)", TRUE_COLOUR),
    ("red: predicted intersection patches (the fitted mask)", PREDICTED_COLOUR),
    ("untinted: not intersection (background or image-only)", None),
)
LEGEND_ROW_HEIGHT = 18


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def ground_truth(records, input_cfg, num_examples: int) -> dict:
  """The first ``num_examples`` records' truth: resized uint8 images, per-token intersection
  tags and text masks, pixel labels, the caption words with their tags, and the items of the
  embedding pass (``{'id', 'image', 'text'}``)."""
  tokenizer = pipeline.tokenizer_for(input_cfg)
  size, length = int(input_cfg.image_size), int(input_cfg.max_text_len)
  columns = {
      k: []
      for k in (
          "raw",
          "text_mask",
          "text_intersection",
          "image_labels",
          "words",
          "word_tags",
          "id",
          "items",
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
    labels = preprocess.crop_resize(
        np.asarray(record["image_labels"], np.uint8), None, size, nearest=True
    )
    caption = _text(record["caption"])
    tags = np.asarray(record["caption_tags"]).reshape(-1)
    _, mask, token_tags = tokenizer.encode_with_word_tags(caption, tags, length)
    identifier = _text(record.get("id", i))
    columns["raw"].append(
        preprocess.crop_resize(preprocess.decode_image(record["image"], where=where), None, size)
    )
    columns["text_mask"].append(mask)
    columns["text_intersection"].append(token_tags)
    columns["image_labels"].append(labels)
    columns["words"].append(caption.split())
    columns["word_tags"].append(tags.tolist())
    columns["id"].append(identifier)
    columns["items"].append({"id": identifier, "image": record["image"], "text": caption})
  if not columns["id"]:
    raise ValueError("solar_masks: the split holds no records")
  listed = ("words", "word_tags", "id", "items")
  return {k: (v if k in listed else np.stack(v)) for k, v in columns.items()}


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


def overlay_figure(raw_images, true_patches, predicted_patches, grid):
  """The overlays (``overlay_rows``) with ``OVERLAY_LEGEND`` drawn under them; returns
  (PIL image, legend texts). The legend adds ``len(OVERLAY_LEGEND) * LEGEND_ROW_HEIGHT + 8`` rows
  of pixels."""
  picture = overlay_rows(raw_images, true_patches, predicted_patches, grid)
  height = picture.shape[0] + len(OVERLAY_LEGEND) * LEGEND_ROW_HEIGHT + 8
  image = Image.new("RGB", (picture.shape[1], height), "white")
  image.paste(Image.fromarray(picture), (0, 0))
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default(size=12)
  y = picture.shape[0] + 4
  for text, colour in OVERLAY_LEGEND:
    x = 4
    if colour is not None:
      draw.rectangle((x, y + 3, x + 11, y + 14), fill=tuple(colour))
      x += 18
    shown = text
    while len(shown) > 1 and draw.textlength(shown, font=font) > image.width - x - 2:
      shown = shown[:-2] + "…"
    draw.text((x, y + 2), shown, fill="black", font=font)
    y += LEGEND_ROW_HEIGHT
  return image, [text for text, _ in OVERLAY_LEGEND]


def _word_masks(tokenizer, words, token_mask_row):
  """Per caption word: predicted when any of its tokens is (tokens follow the start token)."""
  out, position = [], 1
  for word in words:
    count = len(tokenizer.word_ids(word))
    out.append(bool(np.any(token_mask_row[position : position + count])))
    position += count
  return out


def write_files(workdir, truth, image_mask, text_mask, true_patches, grid, num_overlays, input_cfg):
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or a URL (gs://...)
  shown = slice(0, min(num_overlays, len(truth["id"])))
  figure, _ = overlay_figure(truth["raw"][shown], true_patches[shown], image_mask[shown], grid)
  with (epath.Path(workdir) / "overlays.png").open("wb") as f:
    figure.save(f, format="PNG")
  tokenizer = pipeline.tokenizer_for(input_cfg)
  with (epath.Path(workdir) / "text_masks.jsonl").open("w") as f:
    for i in range(shown.stop):
      words = truth["words"][i]
      predicted = _word_masks(tokenizer, words, text_mask[i])
      f.write(
          json.dumps(
              {
                  "id": truth["id"][i],
                  "words": words,
                  "true": [
                      w
                      for w, t in zip(words, truth["word_tags"][i])
                      if t == masks_lib.INTERSECTION_LABEL
                  ],
                  "predicted": [w for w, p in zip(words, predicted) if p],
              }
          )
          + "\n"
      )


def patch_kinds(image_labels, grid, min_fraction=0.25) -> np.ndarray:
  """Per patch: 1 intersection (>= ``min_fraction`` intersection pixels), else 2 image-only
  (>= ``min_fraction`` image-only pixels), else 0 background. [B,H,W] -> int [B,P]."""
  labels = jnp.asarray(image_labels)
  inter = masks_lib.patch_fractions(labels, grid, masks_lib.INTERSECTION_LABEL) >= min_fraction
  only = masks_lib.patch_fractions(labels, grid, masks_lib.DIFFERENCE_LABEL) >= min_fraction
  return np.where(np.asarray(inter), 1, np.where(np.asarray(only), 2, 0))


def auc(positive, negative) -> float:
  """P(a positive scores above a negative), ties counting one half (Mann-Whitney); nan if empty."""
  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  if positive.size == 0 or negative.size == 0:
    return float("nan")
  values = np.concatenate([positive, negative])
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  ranks = (0.5 * (ends - counts + 1 + ends))[inverse]  # average rank over ties
  rank_sum = ranks[: positive.size].sum()
  return float(
      (rank_sum - positive.size * (positive.size + 1) / 2) / (positive.size * negative.size)
  )


def scores_by_kind(scores, kinds, valid, names) -> dict:
  """{kind name: the valid units' scores of that kind} (1-D float arrays)."""
  return {name: scores[valid & (kinds == i)] for i, name in enumerate(names)}


def draw_score_histograms(panels, *, bins=30, width=360, height=180) -> np.ndarray:
  """One uint8 picture: per panel (title, {kind: scores}, threshold) a histogram per kind (each
  normalised to its own count, drawn as a line), the threshold as a dashed vertical line, a legend.
  """
  margin, gap = 28, 10
  picture = Image.new("RGB", (width, len(panels) * (height + gap) + gap), "white")
  draw = ImageDraw.Draw(picture)
  for row, (title, groups, threshold) in enumerate(panels):
    top = gap + row * (height + gap)
    values = np.concatenate([v for v in groups.values() if v.size] + [np.asarray([threshold])])
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1.0
    edges = np.linspace(low, high, bins + 1)
    x_of = lambda v: margin + (v - low) / (high - low) * (width - 2 * margin)
    box = (margin, top + margin // 2, width - margin, top + height - margin)
    draw.rectangle(box, outline=(0, 0, 0))
    densities = {k: np.histogram(v, edges)[0] / max(v.size, 1) for k, v in groups.items()}
    peak = max([d.max() for d in densities.values()] + [1e-9])
    for colour, (kind, density) in zip(KIND_COLOURS, densities.items()):
      centres = x_of(0.5 * (edges[:-1] + edges[1:]))
      ys = box[3] - density / peak * (box[3] - box[1] - 4)
      draw.line(list(zip(centres.tolist(), ys.tolist())), fill=colour, width=2)
    x = x_of(threshold)
    for y in range(box[1], box[3], 6):
      draw.line([(x, y), (x, min(y + 3, box[3]))], fill=(0, 0, 200))
    draw.text((margin, top), f"{title}  (threshold {threshold:.3f})", fill=(0, 0, 0))
    draw.text((margin, box[3] + 2), f"{low:.2f}", fill=(0, 0, 0))
    draw.text((width - margin - 24, box[3] + 2), f"{high:.2f}", fill=(0, 0, 0))
    for i, (colour, kind) in enumerate(zip(KIND_COLOURS, groups)):
      label = f"{kind} (n={groups[kind].size})"
      draw.text((box[2] - 120, box[1] + 4 + 11 * i), label, fill=colour)
  return np.asarray(picture)


def mask_metrics(
    outputs,
    truth,
    *,
    patch_label_fraction=0.25,
    min_variance=1e-6,
    threshold="pairs",
    score="cosine",
):
  """Masks fitted on the evaluated pairs (``masks.fit_masks``) against the ground truth.

  ``outputs``: ``image_tokens`` [N,P,d], ``text_tokens`` [N,L,d], ``z_image``, ``z_text`` [N,d];
  ``truth``: ``text_mask`` and ``text_intersection`` (token tags) [N,L], ``image_labels`` [N,H,W].
  Besides the masks' quality, the scores themselves: their mean per kind of unit
  (``{text,patch}_scores/<kind>``) and the AUC of intersection units against all other units
  (``{text,patch}_mask/auc``: how well any threshold could separate them), and of intersection
  units against difference units alone (``{text,patch}_mask/auc_vs_difference``).
  Returns (metrics in percent, {'image', 'text', 'true_patches'} bool masks, score panels).
  """
  text_mask = np.asarray(truth["text_mask"], bool)
  fitted = jax.device_get(
      masks_lib.fit_masks(
          jnp.asarray(outputs["image_tokens"]),
          jnp.asarray(outputs["text_tokens"]),
          jnp.asarray(text_mask),
          jnp.asarray(outputs["z_image"]),
          jnp.asarray(outputs["z_text"]),
          min_variance=min_variance,
          threshold=threshold,
          score=score,
      )
  )
  image_mask = np.asarray(fitted["image_intersection_mask"])
  text_mask_hat = np.asarray(fitted["text_intersection_mask"])
  grid = masks_lib.patch_grid(np.shape(outputs["image_tokens"])[1])
  kinds = {
      "patch": patch_kinds(truth["image_labels"], grid, patch_label_fraction),
      "text": np.asarray(truth["text_intersection"]),
  }
  true_patches = kinds["patch"] == masks_lib.INTERSECTION_LABEL
  true_tokens = kinds["text"] == masks_lib.INTERSECTION_LABEL
  metrics = {
      "image_threshold": float(fitted["image_threshold"]),
      "text_threshold": float(fitted["text_threshold"]),
      "patch_mask/predicted_fraction": 100.0 * image_mask.mean(),
      "patch_mask/true_fraction": 100.0 * true_patches.mean(),
      "text_mask/predicted_fraction": 100.0 * text_mask_hat[text_mask].mean(),
      "text_mask/true_fraction": 100.0 * true_tokens[text_mask].mean(),
  }
  panels = []
  for name, predicted, true, valid in (
      ("patch_mask", image_mask, true_patches, None),
      ("text_mask", text_mask_hat, true_tokens, text_mask),
  ):
    quality = masks_lib.mask_quality(
        jnp.asarray(predicted), jnp.asarray(true), None if valid is None else jnp.asarray(valid)
    )
    metrics.update({f"{name}/{k}": 100.0 * float(v) for k, v in quality.items()})
    unit = name.split("_")[0]
    scores = np.asarray(fitted["image_scores" if unit == "patch" else "text_scores"])
    valid = np.ones(scores.shape, bool) if valid is None else valid
    groups = scores_by_kind(
        scores, kinds[unit], valid, PATCH_KINDS if unit == "patch" else TEXT_KINDS
    )
    metrics.update({f"{unit}_scores/{k}": float(v.mean()) for k, v in groups.items() if v.size})
    metrics[f"{name}/auc"] = 100.0 * auc(scores[valid & true], scores[valid & ~true])
    difference = valid & (kinds[unit] == DIFFERENCE_KIND)
    metrics[f"{name}/auc_vs_difference"] = 100.0 * auc(scores[valid & true], scores[difference])
    which = "image_threshold" if unit == "patch" else "text_threshold"
    title = (
        "patch scores (vs caption global)"
        if unit == "patch"
        else "text token scores (vs image global)"
    )
    panels.append((title, groups, float(fitted[which])))
  return metrics, {"image": image_mask, "text": text_mask_hat, "true_patches": true_patches}, panels


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
    threshold: str = "pairs",
    score: str = "cosine",
    batches_fn=None,
    mesh=None,
) -> dict:
  """Mask quality on the first ``num_examples`` records; overlays of the first ``num_overlays``.

  A patch is true intersection when at least ``patch_label_fraction`` of its pixels belong to an
  intersection object (``masks.patch_labels``).
  """
  truth = ground_truth(data, input_cfg, num_examples)
  outputs = embed.item_outputs(
      predict_fn,
      truth["items"],
      PASS_OUTPUTS,
      input_cfg=input_cfg,
      batch_size=batch_size,
      params=params,
      batches_fn=batches_fn,
      mesh=mesh,
  )
  if not np.array_equal(outputs["text_mask"] > 0.5, truth["text_mask"]):
    raise ValueError(
        "solar_masks: the embedding pass tokenised the captions differently from "
        "the word-tag tokenisation; the tokenizer must split text on whitespace"
    )
  metrics, predicted, panels = mask_metrics(
      outputs,
      truth,
      patch_label_fraction=patch_label_fraction,
      min_variance=min_variance,
      threshold=threshold,
      score=score,
  )
  if workdir is not None and jax.process_index() == 0:
    write_files(
        workdir,
        truth,
        predicted["image"],
        predicted["text"],
        predicted["true_patches"],
        masks_lib.patch_grid(outputs["image_tokens"].shape[1]),
        num_overlays,
        input_cfg,
    )
    with (epath.Path(workdir) / "scores.png").open("wb") as f:
      Image.fromarray(draw_score_histograms(panels)).save(f, format="PNG")
  return metrics


SOLAR_MASKS = Evaluator(evaluate_solar_masks, data=RECORDS)
