"""The modality gap: how far apart the image, text and image+text embeddings sit on the sphere.

Contrastively trained encoders place each modality in its own narrow cone (Liang et al., 2022,
"Mind the Gap"); GCL is meant to pull the three modalities of a sample together. The gap is read
from the mean embedding (centroid) of each modality over a split's records:

  ``cosine/<a>-<b>``    cosine similarity of the centroids of modalities a and b (1 = no gap)
  ``distance/<a>-<b>``  Euclidean distance between the centroids (Liang et al.'s gap)

for the pairs i-t, i-it and t-it (i = image, t = text, it = image+text, the model's ``z_joint``).
A record contributes to every modality whose inputs it carries: its image (non-empty bytes), its
text (non-empty), and the image+text pair when it has both.
"""

import itertools
from typing import Mapping, Optional

import numpy as np

from mmret.evals import protocols
from mmret.evals.evaluator import RECORDS, Evaluator

# Short modality names (as in the metric keys) -> record modality of the embedding pass.
MODALITIES = {"i": "image", "t": "text", "it": "image,text"}
# Record fields that may hold the text, in order of preference (pairs splits name it 'caption').
TEXT_FIELDS = ("text", "caption")


def centroid_gap(embeddings: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Cosine similarity and distance between the centroids of each pair of modalities.

  Args:
    embeddings: short modality name -> [n, d] embeddings (rows need not be normalised, the
      modalities need not have the same number of rows).
  Returns:
    ``{'cosine/<a>-<b>': ..., 'distance/<a>-<b>': ...}`` for each pair in the order given.
  """
  centroids = {}
  for name, z in embeddings.items():
    z = np.asarray(z, np.float64)
    if z.ndim != 2 or z.shape[0] == 0:
      raise ValueError(f"modality {name!r}: expected a non-empty [n, d] array, got shape {z.shape}")
    centroids[name] = z.mean(axis=0)
  widths = {name: c.shape[0] for name, c in centroids.items()}
  if len(set(widths.values())) > 1:
    raise ValueError(f"modalities have different embedding widths: {widths}")
  out = {}
  for a, b in itertools.combinations(centroids, 2):
    ca, cb = centroids[a], centroids[b]
    norms = np.linalg.norm(ca) * np.linalg.norm(cb)
    if norms == 0:
      raise ValueError(f"the centroid of {a!r} or {b!r} is zero; the cosine is undefined")
    out[f"cosine/{a}-{b}"] = float(ca @ cb / norms)
    out[f"distance/{a}-{b}"] = float(np.linalg.norm(ca - cb))
  return out


def _text_field(record: dict, text_field: Optional[str]) -> str:
  if text_field is not None:
    if text_field not in record:
      raise KeyError(
          f"modality_gap: records have no text field {text_field!r} " f"(fields: {sorted(record)})"
      )
    return text_field
  for name in TEXT_FIELDS:
    if name in record:
      return name
  raise KeyError(
      f"modality_gap: records have none of the text fields {TEXT_FIELDS} "
      f"(fields: {sorted(record)}); set the evaluation's text_field"
  )


class _Records:
  """``records[rows]`` as embedding items of one modality (image bytes and/or text)."""

  def __init__(self, records, rows, modality: str, text_field: str):
    self.records, self.rows, self.text_field = records, list(rows), text_field
    self.parts = set(modality.split(","))

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    record = self.records[self.rows[i]]
    item = {"id": str(record.get("id", self.rows[i]))}
    if "image" in self.parts:
      item["image"] = record["image"]
    if "text" in self.parts:
      item["text"] = protocols._text(record[self.text_field])
    return item


def evaluate_modality_gap(
    predict_fn,
    *,
    data,
    input_cfg,
    workdir=None,
    params=None,
    batch_size: int = 64,
    max_records: Optional[int] = None,
    text_field: Optional[str] = None,
    batches_fn=None,
    mesh=None,
) -> dict:
  """Centroid cosine similarity and distance between the i, t and it embeddings of ``data``.

  Args:
    data: records with ``image`` (encoded bytes, b'' = none) and a text field ('' = none), e.g.
      the universal candidates or a training split's pairs.
    max_records: use only the first this many records (None: all).
    text_field: the record field holding the text (default: 'text', else 'caption').
  Also reports ``count/<modality>``, the number of records embedded for each modality.
  """
  records = data
  num = len(records) if max_records is None else min(int(max_records), len(records))
  if num == 0:
    raise ValueError("modality_gap: the split has no records")
  field = _text_field(records[0], text_field)
  has_image, has_text = [], []
  for row in range(num):
    record = records[row]
    has_image.append(len(record.get("image", b"") or b"") > 0)
    has_text.append(bool(protocols._text(record.get(field, "")).strip()))
  has_image, has_text = np.asarray(has_image), np.asarray(has_text)
  rows = {
      "i": np.flatnonzero(has_image),
      "t": np.flatnonzero(has_text),
      "it": np.flatnonzero(has_image & has_text),
  }
  for name, selected in rows.items():
    if selected.size == 0:
      raise ValueError(
          f"modality_gap: no record among the first {num} carries the "
          f"{MODALITIES[name]!r} inputs"
      )
  embedder = protocols._Embedder(predict_fn, input_cfg, batch_size, params, batches_fn, mesh)
  embeddings = {
      name: embedder.items(_Records(records, rows[name], MODALITIES[name], field), MODALITIES[name])
      for name in MODALITIES
  }
  results = centroid_gap(embeddings)
  results.update({f"count/{name}": float(rows[name].size) for name in MODALITIES})
  return results


MODALITY_GAP = Evaluator(evaluate_modality_gap, data=RECORDS)
