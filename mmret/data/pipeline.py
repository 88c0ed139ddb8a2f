"""Grain input pipelines: the training stream and deterministic evaluation batches.

Training (:func:`make_train_iterator`), per source: record indices -> seeded shuffle -> repeat
(reshuffled each epoch: grain's permutation, computed a block at a time, ``shuffle.py``); sources
mixed by weight; then this process's strided share (``[process_index::process_count]``) ->
decode + augment + tokenize -> batch -> iterator with optional worker processes. Each example's
augmentation RNG comes from ``(seed, global position in the stream)``, so a stream is
reproducible, resumable from ``get_state()`` and the same for any number of workers.

Batches (dicts of numpy arrays, static shapes):
  ``image`` uint8 [b,H,W,3] (the jitted step and embedding pass normalise it with ``input.mean``
  and ``input.std``: ``mmret.ops.normalize_pixels``), ``text_ids`` int32 [b,L], ``text_mask`` bool [b,L];
  with ground truth also ``text_intersection`` int32 [b,L] and ``image_labels`` uint8 [b,H,W].
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import grain
import ml_collections
import numpy as np

from mmret.data import preprocess, shuffle, sources, tokenizers

__all__ = [
    "default_input_config",
    "tokenizer_for",
    "make_train_dataset",
    "make_train_iterator",
    "eval_batches",
    "TrainExample",
]

GROUND_TRUTH_FIELDS = ("caption_tags", "image_labels")


def default_input_config() -> ml_collections.ConfigDict:
  """Input settings with their defaults (configs override fields)."""
  cfg = ml_collections.ConfigDict()
  cfg.data_dir = sources.default_data_dir()  # $MMRET_DATA_DIR or ~/mmret_data
  # Training sources, mixed by (relative) weight.
  cfg.train = [{"dataset": "mmret_world/tiny", "split": "train", "weight": 1.0}]
  cfg.batch_size = 64  # global; each process gets batch_size // process_count
  cfg.image_size = 32
  cfg.max_text_len = 64  # including the start and end tokens; world captions have <= ~51 words
  # dataset (the training dataset's own word vocabulary; 'world' is the same) | word:PATH |
  # bpe:PATH | wordpiece:PATH
  cfg.tokenizer = "dataset"
  # CLIP's per-channel statistics (match CLIP-pretrained towers; harmless from scratch).
  cfg.mean = (0.48145466, 0.4578275, 0.40821073)
  cfg.std = (0.26862954, 0.26130258, 0.27577711)
  cfg.augment = ml_collections.ConfigDict()
  # Random-resized-crop area fraction and aspect-ratio ranges; (1, 1) scale = no crop, the
  # default, because a crop can cut away an object the caption mentions.
  cfg.augment.crop_scale = (1.0, 1.0)
  cfg.augment.crop_ratio = (3 / 4, 4 / 3)
  cfg.augment.flip = False  # world captions may mention left/right
  cfg.worker_count = 0  # data-loading processes (0 = in the main process)
  cfg.worker_buffer_size = 2  # batches each worker prepares ahead
  # Threads preparing whole batches in parallel. Small images are Python-bound (the GIL): on
  # the embedded world, 1 thread prepares more than 2 or 4 (benchmarks/input.py, README). Large
  # images decode and resize outside the GIL and gain from more (e.g. 4 at 224 px).
  cfg.read_threads = 1
  cfg.prefetch = 64  # batches read ahead by those threads
  # Frozen towers' outputs computed once per record and read instead of recomputed
  # (mmret/feature_cache.py): 'auto' (whenever the towers are frozen, dropout is 0 and images
  # are not augmented) | 'on' (an error when those do not hold) | 'off'.
  cfg.feature_cache = "auto"
  cfg.feature_cache_dir = ""  # default: <data_dir>/feature_cache
  cfg.feature_cache_dtype = "float32"  # 'float32' | 'float16' (half the disk)
  return cfg


@functools.lru_cache(maxsize=None)
def _tokenizer(spec: str, dataset: str | None, data_dir: str | None) -> tokenizers.Tokenizer:
  return tokenizers.get_tokenizer(spec, dataset=dataset, data_dir=data_dir)


def tokenizer_for(input_cfg) -> tokenizers.Tokenizer:
  """The (cached) tokenizer of ``input_cfg``; ``'dataset'`` reads the first training dataset's
  vocabulary."""
  dataset = input_cfg.train[0]["dataset"] if input_cfg.get("train") else None
  return _tokenizer(input_cfg.tokenizer, dataset, input_cfg.data_dir)


def _derived_seed(*parts: int) -> int:
  """A 32-bit seed mixing ``parts`` (grain seeds must fit in uint32)."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def record_name(source: sources.RecordSource, index: int, record: dict[str, Any]) -> str:
  return f'{source.dataset}/{source.split}: record {record.get("id", "?")!r} (index {index})'


class TrainExample:
  """Reads one record and turns it into a training example (decode, augment, tokenize).

  Called with the element's position in this process's share of the stream; the global
  position (the same whatever the process count) seeds the augmentation RNG.
  """

  def __init__(
      self,
      input_cfg,
      record_sources: Sequence[sources.RecordSource],
      *,
      seed: int,
      process_index: int,
      process_count: int,
      with_ground_truth: bool,
      features: Sequence[Any] | None = None,
  ):
    self.sources = list(record_sources)
    self.tokenizer = tokenizer_for(input_cfg)
    self.seed = seed
    self.process_index, self.process_count = process_index, process_count
    self.with_ground_truth = with_ground_truth
    self.image_size = int(input_cfg.image_size)
    self.max_text_len = int(input_cfg.max_text_len)
    self.crop_scale = tuple(input_cfg.augment.crop_scale)
    self.crop_ratio = tuple(input_cfg.augment.crop_ratio)
    self.flip = bool(input_cfg.augment.flip)
    # Per source, a store of cached frozen-tower outputs (``mmret.feature_cache``) or None.
    self.features = list(features) if features is not None else [None] * len(self.sources)
    if len(self.features) != len(self.sources):
      raise ValueError(f"{len(self.features)} feature stores for {len(self.sources)} sources")

  @property
  def augments(self) -> bool:
    """True when examples are randomly cropped or flipped (a record has no one fixed image)."""
    return self.crop_scale != (1.0, 1.0) or self.flip

  def __call__(self, local_index: int, element: tuple[int, int]) -> dict[str, np.ndarray]:
    source_index, record_index = element
    source = self.sources[source_index]
    record = source[record_index]
    where = record_name(source, record_index, record)
    global_index = local_index * self.process_count + self.process_index
    # Drawn from only to crop, flip or pick one of several captions.
    rng = None
    if self.augments or "caption" not in record:
      rng = np.random.default_rng([self.seed, global_index])

    store = self.features[source_index]
    if store is None:
      image, labels = self._augmented_image(record, where, rng)
      example = {"image": np.ascontiguousarray(image)}  # uint8: normalised on the device
    else:  # the tower's outputs for this record's (unaugmented) image stand in for its pixels
      labels = self._labels(record, where, None) if self.with_ground_truth else None
      example = store.image_row(record_index)
    caption_index, caption = self._caption(record, where, rng)
    example.update(self.text_fields(record, caption, where))
    if self.with_ground_truth:
      example["image_labels"] = np.ascontiguousarray(labels)
    if store is not None:
      example.update(store.text_row(record_index, caption_index))
    return example

  def text_fields(self, record, caption: str, where: str) -> dict[str, np.ndarray]:
    """``text_ids``, ``text_mask`` (and with ground truth ``text_intersection``) of ``caption``."""
    if self.with_ground_truth:
      try:
        ids, mask, token_tags = self.tokenizer.encode_with_word_tags(
            caption, record["caption_tags"], self.max_text_len
        )
      except ValueError as e:
        raise ValueError(f"{where}: caption_tags do not match the caption: {e}") from e
      return {"text_ids": ids, "text_mask": mask, "text_intersection": token_tags}
    ids, mask = self.tokenizer.encode([caption], self.max_text_len)
    return {"text_ids": ids[0], "text_mask": mask[0]}

  def plain_image(self, record, where: str) -> np.ndarray:
    """The record's image as training sees it without augmentation: resized, uint8."""
    image = preprocess.crop_resize(
        preprocess.open_image(record.get("image"), where=where), None, self.image_size
    )
    return np.ascontiguousarray(image)

  def _labels(self, record, where: str, image_shape) -> np.ndarray:
    """The record's pixel labels, resized as an unaugmented image (shape-checked when given)."""
    labels = np.asarray(record["image_labels"], np.uint8)
    if image_shape is None:  # no image decoded: resized as the unaugmented image would be
      return preprocess.crop_resize(labels, None, self.image_size, nearest=True)
    if labels.shape != image_shape:
      raise ValueError(f"{where}: image_labels shape {labels.shape} != image size {image_shape}")
    return labels

  def _augmented_image(self, record, where: str, rng: np.random.Generator | None):
    """Decoded, cropped, resized and maybe flipped image (uint8) and its pixel labels."""
    image = preprocess.open_image(record.get("image"), where=where)
    shape = (image.height, image.width)
    labels = self._labels(record, where, shape) if self.with_ground_truth else None
    box = None
    if self.crop_scale != (1.0, 1.0):
      box = preprocess.sample_crop_box(*shape, rng, scale=self.crop_scale, ratio=self.crop_ratio)
    image = preprocess.crop_resize(image, box, self.image_size)
    if labels is not None:
      labels = preprocess.crop_resize(labels, box, self.image_size, nearest=True)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
      labels = labels[:, ::-1] if labels is not None else None
    return image, labels

  @staticmethod
  def _caption(record, where: str, rng: np.random.Generator | None) -> tuple[int, str]:
    """(index in :func:`captions_of`, caption): 5-caption splits draw one caption per visit."""
    captions = captions_of(record, where)
    index = int(rng.integers(len(captions))) if "caption" not in record else 0
    return index, captions[index]


def captions_of(record, where: str) -> list[str]:
  """A record's captions: ``[caption]`` or its ``captions`` list."""
  if "caption" in record:
    return [record["caption"]]
  if record.get("captions"):
    return list(record["captions"])
  raise KeyError(f'{where}: no "caption" or "captions" field (fields: {sorted(record)})')


def open_train_sources(input_cfg) -> tuple[list[sources.RecordSource], list[float]]:
  if not input_cfg.train:
    raise ValueError("input_cfg.train is empty: name at least one {dataset, split, weight}")
  record_sources, weights = [], []
  for entry in input_cfg.train:
    entry = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
    missing = {"dataset", "split"} - set(entry)
    if missing:
      raise ValueError(f"input_cfg.train entry {entry} lacks {sorted(missing)}")
    weight = float(entry.get("weight", 1.0))
    if weight <= 0:
      raise ValueError(f"input_cfg.train entry {entry}: weight must be > 0")
    source = sources.open_split(entry["dataset"], entry["split"], input_cfg.data_dir)
    if len(source) == 0:
      raise ValueError(f'{entry["dataset"]}/{entry["split"]} is empty')
    record_sources.append(source)
    weights.append(weight)
  return record_sources, weights


def has_ground_truth(record_sources) -> bool:
  """Ground truth only when every source has it: batch keys must not change along the stream."""
  return all(set(GROUND_TRUTH_FIELDS) <= s.fields for s in record_sources)


def make_train_dataset(
    input_cfg, *, seed: int, process_index: int = 0, process_count: int = 1, features=None
) -> grain.IterDataset:
  """The training stream of this process as a grain ``IterDataset`` of batches.

  ``features``: per training source, a store of its frozen towers' cached outputs
  (``mmret.feature_cache``), which batches carry instead of the images; the stream's order and
  state are the same either way.
  """
  if input_cfg.batch_size % process_count:
    raise ValueError(
        f"batch_size {input_cfg.batch_size} is not divisible by process_count " f"{process_count}"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  record_sources, weights = open_train_sources(input_cfg)
  with_ground_truth = has_ground_truth(record_sources)

  streams = []
  for source_index, source in enumerate(record_sources):
    stream = grain.MapDataset.range(len(source)).map(functools.partial(_tag_source, source_index))
    streams.append(shuffle.EpochShuffle(stream, seed=_derived_seed(seed, source_index)).repeat())
  mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
  examples = mixed[process_index::process_count].map_with_index(
      TrainExample(
          input_cfg,
          record_sources,
          seed=seed,
          process_index=process_index,
          process_count=process_count,
          with_ground_truth=with_ground_truth,
          features=features,
      )
  )
  batches = examples.batch(input_cfg.batch_size // process_count, drop_remainder=True)
  read_options = grain.ReadOptions(
      num_threads=int(input_cfg.read_threads), prefetch_buffer_size=int(input_cfg.prefetch)
  )
  dataset = batches.to_iter_dataset(read_options)
  if input_cfg.worker_count > 0:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=int(input_cfg.worker_count),
            per_worker_buffer_size=int(input_cfg.worker_buffer_size),
        )
    )
  return dataset


def _tag_source(source_index: int, record_index: int) -> tuple[int, int]:
  return source_index, int(record_index)


def make_train_iterator(
    input_cfg, *, seed: int, process_index: int = 0, process_count: int = 1, features=None
) -> grain.DatasetIterator:
  """Checkpointable iterator (``get_state``/``set_state``) over this process's batches."""
  return iter(
      make_train_dataset(
          input_cfg,
          seed=seed,
          process_index=process_index,
          process_count=process_count,
          features=features,
      )
  )


# ----------------------------------------------------------------------------------------------
# Evaluation.


def has_image(item) -> bool:
  image = item.get("image")
  return image is not None and len(image) > 0


def has_text(item) -> bool:
  return bool(item.get("text"))


class ProcessShare:
  """This process's strided share of ``items``, padded to whole batches with ``None`` slots.

  Every process gets the same number of batches, so collective evaluation steps line up.
  """

  def __init__(self, items, batch_size: int, process_index: int, process_count: int):
    self.items = items
    self.positions = range(process_index, len(items), process_count)
    share = -(-len(items) // process_count)  # the largest share, on process 0
    self.length = -(-share // batch_size) * batch_size

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int):
    if i < len(self.positions):
      position = self.positions[i]
      return position, self.items[position]
    return -1, None


class EvalExample:
  """Resizes (no crop, no flip) and tokenizes one item; ``None`` gives a padding row."""

  def __init__(self, input_cfg, *, with_image: bool, with_text: bool):
    self.with_image, self.with_text = with_image, with_text
    self.image_size = int(input_cfg.image_size)
    self.max_text_len = int(input_cfg.max_text_len)
    self.tokenizer = tokenizer_for(input_cfg) if with_text else None

  def __call__(self, element) -> dict[str, np.ndarray]:
    position, item = element
    example = {"valid": np.bool_(item is not None), "index": np.int32(position)}
    if item is not None:
      where = f'item {position} (id {item.get("id", "?")!r})'
      if (has_image(item), has_text(item)) != (self.with_image, self.with_text):
        raise ValueError(
            f"{where} has image={has_image(item)}, text={has_text(item)} but "
            f"item 0 has image={self.with_image}, text={self.with_text}; "
            "group items by modality before batching"
        )
    if self.with_image:
      if item is None:
        image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
      else:
        pixels = preprocess.open_image(item["image"], where=where)
        image = preprocess.crop_resize(pixels, None, self.image_size)
      example["image"] = np.ascontiguousarray(image)
    if self.with_text:
      # Padding rows hold an empty text (start + end tokens) so no row is fully masked.
      ids, mask = self.tokenizer.encode(
          [item["text"] if item is not None else ""], self.max_text_len
      )
      example.update(text_ids=ids[0], text_mask=mask[0])
    return example


def eval_batches(
    items: Sequence[dict[str, Any]],
    *,
    input_cfg,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Deterministic batches of ``items`` for embedding.

  ``items`` is a random-access sequence of dicts with ``image`` (encoded bytes, b'' = absent)
  and/or ``text`` ('' = absent); all items must have the same modalities as item 0.
  Each process takes ``items[process_index::process_count]`` in batches of ``batch_size``
  (per process); every process yields the same number of batches. Batches hold ``image``
  and/or ``text_ids``, ``text_mask``, plus ``valid`` bool [batch_size] (False on padding
  rows) and ``index`` int32 [batch_size] (position in ``items``, -1 on padding rows).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if len(items) == 0:
    return
  with_image, with_text = has_image(items[0]), has_text(items[0])
  if not (with_image or with_text):
    raise ValueError(f'item 0 (id {items[0].get("id", "?")!r}) has neither image nor text')
  share = ProcessShare(items, batch_size, process_index, process_count)
  dataset = (
      grain.MapDataset.source(share)
      .map(EvalExample(input_cfg, with_image=with_image, with_text=with_text))
      .batch(batch_size, drop_remainder=True)
      .to_iter_dataset(
          grain.ReadOptions(
              num_threads=int(input_cfg.read_threads), prefetch_buffer_size=int(input_cfg.prefetch)
          )
      )
  )
  yield from dataset
