"""tfds builder ``mmret_world``: the embedded world (:mod:`mmret.data.world`) on disk.

Importing this module registers the builder, after which
``tfds.data_source('mmret_world/tiny', data_dir=..., split='train')`` reads a prepared
dataset; :func:`prepare` generates it first if needed (offline, without TensorFlow).

Splits and their record schemas (the shared contracts):
- ``train`` (PAIRS): ``id``, ``image``, ``caption``, ``caption_tags``, ``image_labels``.
- ``val`` (PAIRS): held-out pairs of the same kind (ids 'val-NNNNNNN'), never trained on.
- ``mm2mm_queries`` / ``mm2mm_candidates`` and ``universal_queries`` /
  ``universal_candidates`` (RETRIEVAL): candidates ``id``, ``image``, ``text``,
  ``modality``, ``pool``; queries add ``task``, ``instruction``, ``positive_ids``,
  ``candidate_ids``, ``negative_id``, ``negative_kind``.
- ``mm2mm_val_queries`` / ``mm2mm_val_candidates``: a second MM2MM set from its own random stream,
  held out from ``mm2mm`` for choosing settings (pool 'mm2mm_val').
- ``caption5`` (CAPTION5): ``id``, ``image``, ``captions`` (5 distinct strings).

tfds gives one feature set to all splits, so every record holds the union of fields
(:data:`SPLIT_FIELDS` lists each split's own); a field outside its split's schema holds an
empty value: b'' for text and image, [] for lists, a zero-size array for ``caption_tags``
[0] and ``image_labels`` [0, 0]. Read through ``tfds.data_source``, text fields come back
as UTF-8 ``bytes``, lists as lists of ``bytes``, images as encoded PNG ``bytes`` (b'' when
absent); :func:`decode_record` turns a record into the schema's Python types.

The word vocabulary of the grammar (sorted) is ``builder.info.metadata['vocab']``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmret.data import world

PAIRS_FIELDS = ("id", "image", "caption", "caption_tags", "image_labels")
CANDIDATE_FIELDS = ("id", "image", "text", "modality", "pool")
QUERY_FIELDS = CANDIDATE_FIELDS + (
    "task",
    "instruction",
    "positive_ids",
    "candidate_ids",
    "negative_id",
    "negative_kind",
)
CAPTION5_FIELDS = ("id", "image", "captions")
SPLIT_FIELDS = {
    "train": PAIRS_FIELDS,
    "val": PAIRS_FIELDS,
    "mm2mm_queries": QUERY_FIELDS,
    "mm2mm_candidates": CANDIDATE_FIELDS,
    "mm2mm_val_queries": QUERY_FIELDS,
    "mm2mm_val_candidates": CANDIDATE_FIELDS,
    "universal_queries": QUERY_FIELDS,
    "universal_candidates": CANDIDATE_FIELDS,
    "caption5": CAPTION5_FIELDS,
}
_LIST_FIELDS = ("captions", "positive_ids", "candidate_ids")
_ARRAY_FIELDS = ("caption_tags", "image_labels")


@dataclasses.dataclass(eq=False)
class WorldConfig(tfds.core.BuilderConfig):
  """Sizes and look of one world. Every record is a pure function of ``seed``.

  Attributes:
    object_kind: 'shapes' or 'fashion' (see ``world.WorldSpec``).
    seed: root seed of all splits.
    num_train: training pairs.
    num_val: held-out pairs (split ``val``).
    num_mm2mm_triplets, num_mm2mm_distractors: MM2MM anchors and extra pool pairs.
    universal_queries_per_task, universal_distractors_per_task: per M-BEIR-like task.
    num_caption5: images of the 5-caption split.
    image_size: side of the square images in pixels.
    small_extent, large_extent: object side as a fraction of a grid cell (garments are
      drawn larger than figures so that their outline survives resizing to 32x32).
    fashion_dir: Fashion-MNIST directory (Debian package ``dataset-fashion-mnist``).
  """

  object_kind: str = "shapes"
  seed: int = 0
  num_train: int = 512
  num_val: int = 256
  num_mm2mm_triplets: int = 64
  num_mm2mm_distractors: int = 256
  universal_queries_per_task: int = 16
  universal_distractors_per_task: int = 32
  num_caption5: int = 100
  image_size: int = 64
  small_extent: float = 0.5
  large_extent: float = 0.9
  fashion_dir: str = world.DEFAULT_FASHION_DIR

  def spec(self) -> world.WorldSpec:
    return world.WorldSpec(
        object_kind=self.object_kind,
        image_size=self.image_size,
        small_extent=self.small_extent,
        large_extent=self.large_extent,
        fashion_dir=self.fashion_dir,
    )


_SIZES = {
    "tiny": dict(
        num_train=512,
        num_mm2mm_triplets=64,
        num_mm2mm_distractors=256,
        universal_queries_per_task=16,
        universal_distractors_per_task=32,
        num_caption5=100,
    ),
    "small": dict(
        num_train=10_000,
        num_val=1_000,
        num_mm2mm_triplets=500,
        num_mm2mm_distractors=5_000,
        universal_queries_per_task=100,
        universal_distractors_per_task=500,
        num_caption5=1_000,
    ),
    "base": dict(
        num_train=100_000,
        num_val=2_000,
        num_mm2mm_triplets=1_000,
        num_mm2mm_distractors=20_000,
        universal_queries_per_task=300,
        universal_distractors_per_task=2_000,
        num_caption5=5_000,
    ),
}


def _configs() -> list[WorldConfig]:
  configs = []
  looks = (
      ("", dict(object_kind="shapes")),
      ("fashion_", dict(object_kind="fashion", small_extent=0.6, large_extent=0.95)),
  )
  for prefix, look in looks:
    for size, counts in _SIZES.items():
      kind = look["object_kind"]
      configs.append(
          WorldConfig(
              name=prefix + size,
              **look,
              **counts,
              description=f"{size} world of {kind} ({counts['num_train']} training pairs)",
          )
      )
  return configs


def _features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  return tfds.features.FeaturesDict(
      {
          "id": text(),
          # Encoded PNG bytes; decoded by mmret's preprocessing so errors name the record.
          "image": tfds.features.Scalar(dtype=np.object_),
          "caption": text(),
          "caption_tags": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "image_labels": tfds.features.Tensor(
              shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
          ),
          "captions": tfds.features.Sequence(text()),
          "text": text(),
          "modality": text(),
          "pool": text(),
          "task": text(),
          "instruction": text(),
          "positive_ids": tfds.features.Sequence(text()),
          "candidate_ids": tfds.features.Sequence(text()),
          "negative_id": text(),
          "negative_kind": text(),
      }
  )


def _empty_record() -> dict:
  record = {
      name: ""
      for name in (
          "id",
          "caption",
          "text",
          "modality",
          "pool",
          "task",
          "instruction",
          "negative_id",
          "negative_kind",
      )
  }
  record.update(
      image=b"",
      captions=[],
      positive_ids=[],
      candidate_ids=[],
      caption_tags=np.zeros((0,), np.int32),
      image_labels=np.zeros((0, 0), np.uint8),
  )
  return record


class MmretWorld(tfds.core.GeneratorBasedBuilder):
  """Generated image-text data with known intersection / image-only / text-only facts."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "1.1.0": "Held-out sets: MM2MM (mm2mm_val_*) for choosing settings, pairs (val).",
  }
  BUILDER_CONFIGS = _configs()

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default probes `importlib_resources` (a backport that may be absent) for
    # builders defined inside a package; this file is the code path.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=_features(),
        metadata=tfds.core.MetadataDict(vocab=world.vocabulary(self.builder_config.object_kind)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated
    config = self.builder_config
    spec = config.spec()
    mm2mm, mm2mm_val = (
        world.mm2mm(
            spec,
            config.seed,
            config.num_mm2mm_triplets,
            config.num_mm2mm_distractors,
            name=name,
        )
        for name in ("mm2mm", "mm2mm_val")
    )
    universal = world.universal(
        spec, config.seed, config.universal_queries_per_task, config.universal_distractors_per_task
    )
    return {
        "train": self._generate_examples(world.pairs(spec, config.seed, config.num_train)),
        "val": self._generate_examples(world.pairs(spec, config.seed, config.num_val, name="val")),
        "mm2mm_queries": self._generate_examples(mm2mm.queries),
        "mm2mm_candidates": self._generate_examples(mm2mm.candidates),
        "mm2mm_val_queries": self._generate_examples(mm2mm_val.queries),
        "mm2mm_val_candidates": self._generate_examples(mm2mm_val.candidates),
        "universal_queries": self._generate_examples(universal.queries),
        "universal_candidates": self._generate_examples(universal.candidates),
        "caption5": self._generate_examples(world.caption5(spec, config.seed, config.num_caption5)),
    }

  def _generate_examples(self, records):
    for record in records:
      yield record["id"], {**_empty_record(), **record}


def decode_record(record: dict, split: str) -> dict:
  """``split``'s schema fields of a record read by tfds, as Python types.

  Text becomes ``str``, string lists ``list[str]``, images stay encoded ``bytes`` and
  ground-truth arrays numpy arrays.
  """
  if split not in SPLIT_FIELDS:
    raise KeyError(f"unknown mmret_world split {split!r}; expected one of {tuple(SPLIT_FIELDS)}")
  decoded = {}
  for name in SPLIT_FIELDS[split]:
    if name not in record:
      raise KeyError(f"record {record.get('id')!r} of split {split!r} lacks field {name!r}")
    value = record[name]
    if name == "image":
      decoded[name] = bytes(value)
    elif name in _ARRAY_FIELDS:
      decoded[name] = np.asarray(value)
    elif name in _LIST_FIELDS:
      decoded[name] = [_text(v) for v in value]
    else:
      decoded[name] = _text(value)
  return decoded


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def prepare(config_name: str | WorldConfig = "tiny", data_dir: str | None = None) -> MmretWorld:
  """The ``mmret_world/<config_name>`` builder, generated first if not yet on disk.

  ``config_name`` is one of the named configs ('tiny', 'small', 'base', 'fashion_tiny',
  ...) or a ``WorldConfig``; ``data_dir`` defaults to tfds' data directory.
  """
  if isinstance(config_name, str):
    names = [c.name for c in MmretWorld.BUILDER_CONFIGS]
    if config_name not in names:
      raise ValueError(f"unknown mmret_world config {config_name!r}; expected one of {names}")
  builder = MmretWorld(config=config_name, data_dir=data_dir)
  builder.download_and_prepare()
  return builder
