"""Feature definitions of mmret's on-disk record schemas (one function per schema).

Every mmret dataset (imported or generated) stores images as their original encoded PNG/JPEG
bytes in a ``tfds.features.Scalar(np.object_)`` feature, never ``tfds.features.Image``: decoding
happens in mmret's preprocessing, where a corrupt image can be reported by record id. Text fields
are ``tfds.features.Text`` and come back from ``as_data_source`` as UTF-8 ``bytes``.

A tfds dataset has one feature dict for all of its splits, so a dataset holding several schemas
(e.g. ``<name>_queries`` and ``<name>_candidates``) uses ``merge_features`` of them and fills the
fields a record's schema lacks with ``blank_example`` values ('' / b'' / [] / empty arrays).
"""

from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds

# The three modalities a retrieval record can have (contract order: image before text).
MODALITIES = ("image", "text", "image,text")
# Hard-negative kinds of MM2MM queries ('' = no hard negative).
NEGATIVE_KINDS = ("intersection", "image_only", "text_only", "")


def _encoded_image():
  return tfds.features.Scalar(np.object_, doc="encoded PNG/JPEG bytes; b'' when absent")


def _text(doc: str):
  return tfds.features.Text(doc=doc)


def _texts(doc: str):
  return tfds.features.Sequence(tfds.features.Text(), doc=doc)


def pairs_features(with_ground_truth: bool = False) -> dict:
  """PAIRS: one image-caption pair per record (training splits).

  Args:
    with_ground_truth: add the embedded world's labels: ``caption_tags`` int32 [n_words] (tag of
      each whitespace-separated word of ``caption``) and ``image_labels`` uint8 [H, W]; tags are
      0 = background / not content, 1 = intersection, 2 = one modality only.
  """
  features = {
      "id": _text("record id, unique within the split"),
      "image": _encoded_image(),
      "caption": _text("caption of the image"),
  }
  if with_ground_truth:
    features["caption_tags"] = tfds.features.Tensor(
        shape=(None,), dtype=np.int32, doc="tag per whitespace-separated caption word"
    )
    # Two unknown dimensions need an explicit encoding in tfds.
    features["image_labels"] = tfds.features.Tensor(
        shape=(None, None), dtype=np.uint8, encoding="zlib", doc="tag per pixel"
    )
  return features


def caption5_features() -> dict:
  """CAPTION5: one image with its captions (Flickr/COCO-style image-text evaluation)."""
  return {
      "id": _text("image id, unique within the split"),
      "image": _encoded_image(),
      "captions": _texts("the image's captions, 5 per image"),
  }


def candidates_features() -> dict:
  """RETRIEVAL candidates: a text, an image or both, in a named local pool."""
  return {
      "id": _text("candidate id, unique within the split"),
      "image": _encoded_image(),
      "text": _text("candidate text; '' when absent"),
      "modality": _text("one of 'image', 'text', 'image,text'"),
      "pool": _text("local pool the candidate belongs to"),
  }


def queries_features() -> dict:
  """RETRIEVAL queries: what to search for, where, and the answers."""
  return {
      **candidates_features(),
      "id": _text("query id, unique within the split"),
      "pool": _text("local pool to search"),
      "task": _text("task the query belongs to (metrics are reported per task)"),
      "instruction": _text("task instruction; '' when none"),
      "positive_ids": _texts("ids of the correct candidates"),
      "candidate_ids": _texts(
          "the query's own candidate list (first = correct); [] = search the pool"
      ),
      "negative_id": _text("MM2MM hard negative candidate id; '' when none"),
      "negative_kind": _text("'intersection' | 'image_only' | 'text_only' | ''"),
  }


def merge_features(*schemas: Mapping) -> tfds.features.FeaturesDict:
  """One FeaturesDict holding the fields of all ``schemas``; shared fields must agree in type."""
  merged = {}
  for schema in schemas:
    for name, feature in schema.items():
      if name in merged and _signature(merged[name]) != _signature(feature):
        raise ValueError(
            f"feature {name!r} is defined differently by two schemas: "
            f"{merged[name]!r} vs {feature!r}"
        )
      merged.setdefault(name, feature)
  return tfds.features.FeaturesDict(merged)


def _signature(feature) -> str:
  # repr() carries the doc string too; compare the type and its shape/dtype only.
  return f"{type(feature).__name__}{feature.shape}{feature.np_dtype}"


def blank_value(feature):
  """The value a record stores in a field its schema does not have."""
  if isinstance(feature, tfds.features.Text):
    return ""
  if isinstance(feature, tfds.features.Sequence):
    return []
  if isinstance(feature, tfds.features.Scalar) and feature.np_dtype == np.object_:
    return b""
  if isinstance(feature, tfds.features.Tensor):
    return np.zeros([0 if d is None else d for d in feature.shape], dtype=feature.np_dtype)
  raise TypeError(f"no blank value for feature type {type(feature).__name__}")


def blank_example(features: tfds.features.FeaturesDict) -> dict:
  """A record with every field of ``features`` blank."""
  return {name: blank_value(feature) for name, feature in features.items()}
