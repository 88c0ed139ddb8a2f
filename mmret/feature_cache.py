"""Frozen-tower feature cache: each example's tower outputs computed once, then read, not recomputed.

When both towers are frozen (``optim.freeze`` matches every ``image_tower/`` and ``text_tower/``
parameter), run without dropout and see unaugmented images, their outputs are a fixed function of
each record. Fine-tuning the rest of the model on top of them (adapters, projections, the joint
encoder) then needs the towers' forward pass once per record instead of once per step: training
batches carry the cached outputs (``image_tower_pooled``, ``image_tower_tokens``,
``text_tower_pooled``, ``text_tower_tokens``; see ``mmret.models.retrieval``) in place of pixels,
and evaluations embed their items from cached outputs too. SOLAR's stage-1 teacher, a copy of the
frozen towers, reads the same cache.

``config.input.feature_cache``: 'auto' (default: on whenever the conditions above hold), 'on' (an
error naming each unmet condition) or 'off'. Caches live in ``config.input.feature_cache_dir``
(default ``<data_dir>/feature_cache``), one directory per (dataset, split or item set, preprocessing,
tokenizer, tower architecture, storage dtype, tower parameters), so runs that share frozen towers
(seeds, losses, stages) share them; ``input.feature_cache_dtype`` ('float32' default, or 'float16'
to halve the disk) is the storage type. A training-split cache holds::

  image_pooled.npy [N,Ci]   image_tokens.npy [N,P,Ci]    one row per record, in record order
  text_pooled.npy [M,Ct]    text_tokens.npy [M,L,Ct]     one row per caption
  text_offsets.npy [N+1]    record i's captions are rows offsets[i]:offsets[i+1]
  manifest.json             what the key covers; written last, so a directory with it is complete

An evaluation cache holds the same arrays for one ordered item set (one row per item). Caches are
built in a staging directory and renamed into place, so an interrupted build leaves no partial
cache and concurrent processes do not clash.

The cache directory may be a URL (``gs://bucket/mmret_data/feature_cache``, e.g. under a ``gs://``
``data_dir``): memory maps need local files, so a cache is then built in a local temporary
directory and copied there (``manifest.json`` last, so a cache with it is complete), and a cache
read from there is first copied once to ``$TMPDIR/mmret_feature_cache/`` and memory-mapped there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath

from mmret import faults, ops
from mmret.data import pipeline, tokenizers
from mmret.models.retrieval import IMAGE_FEATURES, TEXT_FEATURES

MODES = ("auto", "on", "off")
DTYPES = ("float32", "float16")
TOWERS = ("image_tower", "text_tower")
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------
# When the cache applies.


def blockers(config, frozen_mask) -> list[str]:
  """Why ``config``'s tower outputs are not a fixed function of each record (empty: they are).

  ``frozen_mask``: ``optim.frozen_mask`` over the model's parameters (None: nothing frozen).
  """
  reasons = []
  unfrozen = []
  for tower in TOWERS:
    leaves = jax.tree.leaves((frozen_mask or {}).get(tower, False))
    if not leaves or not all(leaves):
      unfrozen.append(tower)
  if unfrozen:
    reasons.append(
        f"optim.freeze={config.optim.freeze!r} does not freeze every parameter of {unfrozen}"
    )
  if float(config.model.dropout) > 0:
    reasons.append(f"model.dropout={config.model.dropout} (the towers' outputs are random)")
  augment = config.input.augment
  if tuple(augment.crop_scale) != (1.0, 1.0) or bool(augment.flip):
    reasons.append(
        f"input.augment crops or flips (crop_scale={tuple(augment.crop_scale)}, "
        f"flip={augment.flip}): a record has no one fixed image"
    )
  lora = config.model.get("lora")
  if lora is not None and int(lora.get("rank", 0)) > 0:
    reasons.append(f"model.lora.rank={lora.rank} adapts tower weights during training")
  return reasons


def enabled(config, frozen_mask) -> bool:
  """Whether training and evaluation read cached tower outputs (``input.feature_cache``)."""
  mode = config.input.get("feature_cache", "auto")
  if mode not in MODES:
    raise ValueError(f"input.feature_cache must be one of {MODES}, got {mode!r}")
  if mode == "off":
    return False
  reasons = blockers(config, frozen_mask)
  if reasons and mode == "on":
    raise ValueError(
        "input.feature_cache='on' but the towers' outputs change: " + "; ".join(reasons)
    )
  return not reasons


def cache_root(input_cfg) -> str:
  root = input_cfg.get("feature_cache_dir") or ""
  return root or os.path.join(input_cfg.data_dir, "feature_cache")


def storage_dtype(input_cfg) -> np.dtype:
  name = input_cfg.get("feature_cache_dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"input.feature_cache_dtype must be one of {DTYPES}, got {name!r}")
  return np.dtype(name)


# ----------------------------------------------------------------------------------------------
# The towers' forward pass.


def tower_digest(params) -> str:
  """sha256 of the towers' parameters (paths, shapes, dtypes and bytes)."""
  digest = hashlib.sha256()
  for tower in TOWERS:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params[tower])[0]:
      value = _host_copy(leaf)
      digest.update(f"{tower}{jax.tree_util.keystr(path)}{value.shape}{value.dtype}".encode())
      digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def _host_copy(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


class TowerPass:
  """The frozen towers as numpy functions (jitted once): uint8 images -> outputs (normalised with
  ``input_cfg.mean``/``std`` on the device, as in training), token ids -> outputs."""

  def __init__(self, model, params, input_cfg):
    # This process's copy of the (replicated) parameters, on the host: the model's setup needs
    # them all; the key covers the towers' only.
    self.params = jax.tree.map(_host_copy, dict(params))
    self.digest = tower_digest(self.params)
    mean, std = tuple(input_cfg.mean), tuple(input_cfg.std)
    self._image = jax.jit(
        lambda p, x: model.apply(
            {"params": p},
            ops.normalize_pixels(x, mean, std),
            method=lambda m, x: m.image_tower(x, train=False),
        )
    )
    self._text = jax.jit(
        lambda p, ids, mask: model.apply(
            {"params": p}, ids, mask, method=lambda m, i, k: m.text_tower(i, k, train=False)
        )
    )
    self.model_fields = {
        "image": dict(model.image),
        "text": dict(model.text),
        "dtype": str(model.dtype),
    }

  def image(self, images: np.ndarray) -> dict[str, np.ndarray]:
    out = self._image(self.params, images)
    return {k: np.asarray(out[k], np.float32) for k in ("pooled", "tokens")}

  def text(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    out = self._text(self.params, ids, mask)
    return {k: np.asarray(out[k], np.float32) for k in ("pooled", "tokens")}


# ----------------------------------------------------------------------------------------------
# Stores.


class FeatureStore:
  """A complete cache directory, read row by row (memory-mapped; pickles as its path only)."""

  def __init__(self, directory: str):
    self.directory = directory
    path = epath.Path(directory) / MANIFEST
    if not path.exists():
      raise FileNotFoundError(f"{directory} is not a complete feature cache (no {MANIFEST})")
    self.manifest = json.loads(path.read_text())
    self._arrays = None

  def __getstate__(self):
    return {"directory": self.directory, "manifest": self.manifest, "_arrays": None}

  def array(self, name: str) -> np.ndarray:
    if self._arrays is None:  # opened on first use in each process (reader threads may race)
      local = _local_copy(self.directory) if faults.is_url(self.directory) else self.directory
      self._arrays = {
          array: np.load(os.path.join(local, f"{array}.npy"), mmap_mode="r")
          for array in self.manifest["arrays"]
      }
    if name not in self._arrays:
      raise KeyError(f"feature cache {self.directory} has no {name!r}")
    return self._arrays[name]

  def image_row(self, index: int) -> dict[str, np.ndarray]:
    return {
        IMAGE_FEATURES[part]: np.asarray(self.array(f"image_{part}")[index], np.float32)
        for part in ("pooled", "tokens")
    }

  def text_row(self, index: int, caption: int = 0) -> dict[str, np.ndarray]:
    """Outputs of caption ``caption`` of record ``index`` (or of item ``index``: no offsets)."""
    row = index
    if "text_offsets" in self.manifest.get("arrays", []):
      offsets = self.array("text_offsets")
      row = int(offsets[index]) + caption
      if row >= offsets[index + 1]:
        raise IndexError(f"record {index} has {offsets[index + 1] - offsets[index]} captions")
    return {
        TEXT_FEATURES[part]: np.asarray(self.array(f"text_{part}")[row], np.float32)
        for part in ("pooled", "tokens")
    }


class _Writer:
  """Fills ``.npy`` files row block by row block in a staging directory, then moves it in place."""

  def __init__(self, directory: str, dtype: np.dtype):
    self.directory, self.dtype = directory, dtype
    if faults.is_url(directory):  # memory maps are local: built here, copied at commit
      self.staging = tempfile.mkdtemp(prefix="mmret-feature-cache-")
    else:
      self.staging = f"{directory}.staging-{os.getpid()}-{jax.process_index()}"
      shutil.rmtree(self.staging, ignore_errors=True)
      os.makedirs(self.staging)
    self.arrays: dict[str, np.ndarray] = {}

  def write(self, name: str, start: int, rows: np.ndarray, total: int):
    if name not in self.arrays:
      dtype = np.int64 if name == "text_offsets" else self.dtype
      self.arrays[name] = np.lib.format.open_memmap(
          os.path.join(self.staging, f"{name}.npy"),
          mode="w+",
          dtype=dtype,
          shape=(total,) + rows.shape[1:],
      )
    self.arrays[name][start : start + len(rows)] = rows

  def commit(self, manifest: dict) -> FeatureStore:
    for array in self.arrays.values():
      array.flush()
    manifest = dict(manifest, arrays=sorted(self.arrays))
    with open(os.path.join(self.staging, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
    self.arrays.clear()
    if faults.is_url(self.directory):
      if not (epath.Path(self.directory) / MANIFEST).exists():  # else another process's is done
        _copy_files(self.staging, self.directory)
      shutil.rmtree(self.staging, ignore_errors=True)
      return FeatureStore(self.directory)
    try:
      os.rename(self.staging, self.directory)
    except OSError:  # another process finished the same cache first
      if not os.path.exists(os.path.join(self.directory, MANIFEST)):
        raise
      shutil.rmtree(self.staging, ignore_errors=True)
    return FeatureStore(self.directory)

  def abandon(self):
    self.arrays.clear()
    shutil.rmtree(self.staging, ignore_errors=True)


def _copy_files(source, target):
  """Copies the files of folder ``source`` to folder ``target`` (local or URL), ``MANIFEST``
  last: a copy interrupted before it is not a complete cache."""
  source, target = epath.Path(source), epath.Path(target)
  target.mkdir(parents=True, exist_ok=True)
  names = sorted((p.name for p in source.iterdir()), key=lambda name: name == MANIFEST)
  for name in names:
    with (source / name).open("rb") as f, (target / name).open("wb") as out:
      shutil.copyfileobj(f, out, 1 << 20)


def _local_copy(directory: str) -> str:
  """A local copy of the complete cache at URL ``directory`` (copied on first use), to memory-map."""
  local = os.path.join(
      tempfile.gettempdir(), "mmret_feature_cache", re.sub(r"[^A-Za-z0-9_.-]+", "_", directory)
  )
  if os.path.exists(os.path.join(local, MANIFEST)):
    return local
  logging.info("Copying the feature cache %s to %s", directory, local)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  staging = tempfile.mkdtemp(
      prefix=f"{os.path.basename(local)}.staging-", dir=os.path.dirname(local)
  )
  try:
    _copy_files(directory, staging)
    os.rename(staging, local)
  except OSError:  # another reader finished the same copy first
    if not os.path.exists(os.path.join(local, MANIFEST)):
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return local


def _cache_dir(input_cfg, name: str, key_fields: dict) -> tuple[str, str]:
  key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-80:]
  return os.path.join(cache_root(input_cfg), f"{safe}-{key[:16]}"), key


def _preprocessing(input_cfg) -> dict:
  return dict(
      image_size=int(input_cfg.image_size),
      mean=list(input_cfg.mean),
      std=list(input_cfg.std),
      tokenizer=tokenizers.fingerprint(input_cfg.tokenizer),
      max_text_len=int(input_cfg.max_text_len),
      dtype=str(storage_dtype(input_cfg)),
  )


def _log_progress(what: str, done: int, total: int, start: float, last: list):
  now = time.time()
  if done == total or now - last[0] > 10:
    last[0] = now
    rate = done / max(now - start, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    logging.info("%s: %d/%d (%.1f/s, ETA %.0f s)", what, done, total, rate, eta)


# ----------------------------------------------------------------------------------------------
# Training splits.


def build_split(
    example: pipeline.TrainExample,
    source_index: int,
    towers: TowerPass,
    directory: str,
    manifest: dict,
    *,
    dtype,
    batch_size: int = 64,
) -> FeatureStore:
  """Computes and stores the tower outputs of every record (and caption) of one training source,
  preprocessed as ``example`` (a ``pipeline.TrainExample`` without augmentation) would."""
  source = example.sources[source_index]
  n = len(source)
  what = f"feature cache {source.dataset}/{source.split}"
  counts = np.zeros(n + 1, np.int64)
  for i in range(n):  # captions per record: the text arrays' size
    counts[i + 1] = len(pipeline.captions_of(source[i], pipeline.record_name(source, i, source[i])))
  offsets = np.cumsum(counts)
  writer = _Writer(directory, dtype)
  start, last = time.time(), [0.0]
  try:
    writer.write("text_offsets", 0, offsets, n + 1)
    for begin in range(0, n, batch_size):
      images, ids, masks = [], [], []
      for i in range(begin, min(begin + batch_size, n)):
        record = source[i]
        where = pipeline.record_name(source, i, record)
        images.append(example.plain_image(record, where))
        for caption in pipeline.captions_of(record, where):
          fields = example.text_fields(record, caption, where)
          ids.append(fields["text_ids"])
          masks.append(fields["text_mask"])
      image_out = towers.image(np.stack(images))
      text_out = towers.text(np.stack(ids), np.stack(masks))
      for part in ("pooled", "tokens"):
        writer.write(f"image_{part}", begin, image_out[part], n)
        writer.write(f"text_{part}", int(offsets[begin]), text_out[part], int(offsets[-1]))
      _log_progress(what, min(begin + batch_size, n), n, start, last)
    store = writer.commit(manifest)
  except BaseException:
    writer.abandon()
    raise
  logging.info("%s: %d records in %.1f s -> %s", what, n, time.time() - start, directory)
  return store


def for_training(config, towers: TowerPass) -> list[FeatureStore]:
  """One feature store per training source of ``config`` (built where missing)."""
  record_sources, _ = pipeline.open_train_sources(config.input)
  with_ground_truth = pipeline.has_ground_truth(record_sources)
  example = pipeline.TrainExample(
      config.input,
      record_sources,
      seed=0,
      process_index=0,
      process_count=1,
      with_ground_truth=with_ground_truth,
  )
  if example.augments:
    raise ValueError("the feature cache needs unaugmented images (input.augment)")
  dtype = storage_dtype(config.input)
  stores = []
  for index, source in enumerate(record_sources):
    fields = dict(
        kind="train",
        dataset=source.dataset,
        split=source.split,
        records=len(source),
        ground_truth=with_ground_truth,
        towers=towers.digest,
        model=towers.model_fields,
        **_preprocessing(config.input),
    )
    directory, key = _cache_dir(config.input, f"{source.dataset}-{source.split}", fields)
    if (epath.Path(directory) / MANIFEST).exists():
      logging.info("Feature cache for %s/%s: %s", source.dataset, source.split, directory)
      stores.append(FeatureStore(directory))
    else:
      stores.append(
          build_split(example, index, towers, directory, dict(fields, key=key), dtype=dtype)
      )
  return stores


# ----------------------------------------------------------------------------------------------
# Evaluation items.


def _items_digest(items: Sequence[dict]) -> tuple[str, bool, bool]:
  """sha256 over the items' images and texts in order, and whether they hold images / text."""
  digest = hashlib.sha256()
  with_image = pipeline.has_image(items[0])
  with_text = pipeline.has_text(items[0])
  for item in items:
    image = item.get("image") if with_image else b""
    text = item.get("text", "") if with_text else ""
    digest.update(len(image or b"").to_bytes(8, "little"))
    digest.update(bytes(image or b""))
    digest.update(str(text).encode("utf-8") + b"\0")
  return digest.hexdigest(), with_image, with_text


class EvalBatches:
  """``pipeline.eval_batches``-compatible batches carrying cached tower outputs instead of pixels.

  The first evaluation of an item set computes its tower outputs (all items, on every process)
  and stores them; later evaluations (and later runs with the same towers) read them. Batches hold
  ``valid``, ``index``, the cached outputs and, for text, ``text_ids`` / ``text_mask``.
  """

  def __init__(self, towers: TowerPass, input_cfg):
    self.towers, self.input_cfg = towers, input_cfg
    self.dtype = storage_dtype(input_cfg)

  def store(self, items: Sequence[dict], input_cfg) -> FeatureStore:
    digest, with_image, with_text = _items_digest(items)
    fields = dict(
        kind="eval",
        items=digest,
        count=len(items),
        towers=self.towers.digest,
        model=self.towers.model_fields,
        **_preprocessing(input_cfg),
    )
    directory, key = _cache_dir(input_cfg, f"eval-{len(items)}", fields)
    if (epath.Path(directory) / MANIFEST).exists():
      return FeatureStore(directory)
    writer = _Writer(directory, self.dtype)
    start, last = time.time(), [0.0]
    try:
      for batch in pipeline.eval_batches(items, input_cfg=input_cfg, batch_size=64):
        rows = batch["index"][batch["valid"]]
        begin = int(rows[0])
        if with_image:
          out = self.towers.image(batch["image"])
          for part in ("pooled", "tokens"):
            writer.write(f"image_{part}", begin, out[part][batch["valid"]], len(items))
        if with_text:
          out = self.towers.text(batch["text_ids"], batch["text_mask"])
          for part in ("pooled", "tokens"):
            writer.write(f"text_{part}", begin, out[part][batch["valid"]], len(items))
        _log_progress(
            f"feature cache of {len(items)} items", begin + len(rows), len(items), start, last
        )
      return writer.commit(dict(fields, key=key))
    except BaseException:
      writer.abandon()
      raise

  def __call__(
      self, items, *, input_cfg, batch_size: int, process_index: int = 0, process_count: int = 1
  ):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(items) == 0:
      return
    store = self.store(items, input_cfg)
    with_image = "image_tokens" in store.manifest["arrays"]
    with_text = "text_tokens" in store.manifest["arrays"]
    tokenizer = pipeline.tokenizer_for(input_cfg) if with_text else None
    share = pipeline.ProcessShare(items, batch_size, process_index, process_count)
    for begin in range(0, len(share), batch_size):
      slots = [share[i] for i in range(begin, begin + batch_size)]
      positions = np.array([p for p, _ in slots], np.int32)
      valid = positions >= 0
      rows = np.where(valid, positions, 0)
      batch = {"valid": valid, "index": positions}
      if with_image:
        for part, key in IMAGE_FEATURES.items():
          values = np.asarray(store.array(f"image_{part}")[rows], np.float32)
          batch[key] = np.where(valid.reshape((-1,) + (1,) * (values.ndim - 1)), values, 0)
      if with_text:
        for part, key in TEXT_FEATURES.items():
          values = np.asarray(store.array(f"text_{part}")[rows], np.float32)
          batch[key] = np.where(valid.reshape((-1,) + (1,) * (values.ndim - 1)), values, 0)
        texts = [item["text"] if item is not None else "" for _, item in slots]
        batch["text_ids"], batch["text_mask"] = tokenizer.encode(texts, int(input_cfg.max_text_len))
      yield batch
