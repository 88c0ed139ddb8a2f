"""Random-access record sources over prepared tensorflow-datasets (ArrayRecord) datasets.

A dataset is named either by a registered tfds name with config (``mmret_world/tiny``: the
embedded world, prepared offline on first use) or by the path of a prepared tfds dataset
directory (the one holding ``dataset_info.json``). Records come back as plain dicts: ``image``
stays encoded bytes (or the decoded array a ``tfds.features.Image`` gives), every other bytes
value becomes ``str`` and lists of bytes become lists of ``str``.

tfds gives all splits of a dataset one feature set. A builder whose module defines
``SPLIT_FIELDS`` (split name -> field names, as ``mmret.data.world_builder`` does) has its
records cut down to their split's own fields, so a record's keys say what it holds.

A dataset directory and ``data_dir`` may be URLs (``gs://bucket/mmret/flickr30k``): they are
checked through ``etils.epath`` and handed to tfds unchanged (never expanded or made absolute);
the ArrayRecord reader opens the ``gs://`` shard paths tfds lists itself.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import numpy as np
from etils import epath

from mmret import faults

__all__ = ["default_data_dir", "load_builder", "open_split", "dataset_metadata", "RecordSource"]

# Fields that hold encoded image bytes: never decoded to text.
BYTES_FIELDS = frozenset({"image"})
_WORLD_NAME = "mmret_world"


def _expanded(path: str) -> str:
  """``~`` expanded in a local path; a URL unchanged."""
  return path if faults.is_url(path) else os.path.expanduser(path)


def default_data_dir() -> str:
  """``$MMRET_DATA_DIR`` (a local path or a URL), else ``~/mmret_data``."""
  return _expanded(os.environ.get("MMRET_DATA_DIR", "~/mmret_data"))


def _is_directory_spec(dataset: str) -> bool:
  return (
      faults.is_url(dataset) or dataset.startswith(("/", ".", "~")) or epath.Path(dataset).is_dir()
  )


@functools.lru_cache(maxsize=None)
def load_builder(dataset: str, data_dir: str | None = None):
  """The prepared tfds builder of ``dataset`` (preparing the embedded world when needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  data_dir = _expanded(data_dir) if data_dir else default_data_dir()
  if _is_directory_spec(dataset):
    path = _expanded(dataset)
    if not (epath.Path(path) / "dataset_info.json").exists():
      raise FileNotFoundError(
          f"dataset {dataset!r}: {path} is not a prepared tfds dataset "
          "directory (no dataset_info.json)"
      )
    return tfds.builder_from_directory(path)
  name, _, config = dataset.partition("/")
  if name == _WORLD_NAME:
    # Importing the module registers the builder; it is prepared offline on first use.
    from mmret.data import world_builder  # pylint: disable=import-outside-toplevel

    builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      world_builder.prepare(config or builder.builder_config.name, data_dir)
      builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
    return builder
  try:
    builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # tfds raises several types for unknown names and configs
    raise ValueError(
        f"unknown dataset {dataset!r}: not a prepared tfds directory nor a "
        f"registered tfds name ({e})"
    ) from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {dataset!r} is not prepared under {data_dir}; prepare it "
        'with its builder (file_format="array_record") first'
    )
  return builder


def _split_fields(builder, split: str) -> frozenset[str]:
  """Fields of ``split``: the builder module's ``SPLIT_FIELDS`` entry, else every feature."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  features = frozenset(builder.info.features.keys())
  if builder.info.name == _WORLD_NAME:
    from mmret.data import world_builder  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  try:
    module = sys.modules[tfds.builder_cls(builder.info.name).__module__]
  except Exception:  # not registered in this process (e.g. a directory of another builder)
    return features
  fields = getattr(module, "SPLIT_FIELDS", {}).get(split)
  return features if fields is None else features & frozenset(fields)


def dataset_metadata(dataset: str, data_dir: str | None = None) -> dict[str, Any]:
  """The ``info.metadata`` dict of ``dataset`` (empty when it has none)."""
  metadata = load_builder(dataset, data_dir).info.metadata
  return dict(metadata) if metadata is not None else {}


def _to_python(key: str, value: Any) -> Any:
  if key in BYTES_FIELDS:
    return value
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
    return [_to_python(key, v) for v in value]
  return value


class RecordReadError(OSError):
  """A record of a prepared dataset cannot be read (e.g. a truncated ArrayRecord file)."""


class RecordSource:
  """A split of a dataset as a random-access sequence of record dicts.

  Pickles as its name only (the ArrayRecord readers are reopened), so it can be sent to
  data-loading worker processes.
  """

  def __init__(self, dataset: str, split: str, data_dir: str | None = None):
    self.dataset, self.split, self.data_dir = dataset, split, data_dir
    builder = load_builder(dataset, data_dir)
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
      raise KeyError(f"dataset {dataset!r} has no split {split!r}; available splits: {splits}")
    self.fields = _split_fields(builder, split)
    self._records = builder.as_data_source(split)

  def __len__(self) -> int:
    return len(self._records)

  def _file_of(self, index: int) -> str:
    """The ArrayRecord file holding record ``index`` (best effort: the split's files)."""
    reader = getattr(self._records, "data_source", None)
    paths = list(getattr(reader, "_paths", None) or [])
    prefix_sums = list(getattr(reader, "_prefix_sums", None) or [])
    if paths and len(prefix_sums) == len(paths):
      for path, end in zip(paths, prefix_sums):
        if index < end:
          return str(path)
    return ", ".join(str(p) for p in paths) or "?"

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      record = self._records[int(index)]
    except IndexError:
      raise
    except Exception as e:  # ArrayRecord/Riegeli raise RuntimeError for damaged files
      raise RecordReadError(
          f"dataset {self.dataset!r}, split {self.split!r}: record {index} cannot be read from "
          f"{self._file_of(int(index))} ({type(e).__name__}: {e}). The file may be truncated or "
          "corrupt: prepare the dataset again"
      ) from e
    return {key: _to_python(key, value) for key, value in record.items() if key in self.fields}

  def __getstate__(self):
    return {"dataset": self.dataset, "split": self.split, "data_dir": self.data_dir}

  def __setstate__(self, state):
    self.__init__(state["dataset"], state["split"], state["data_dir"])

  def __repr__(self) -> str:
    return f"RecordSource({self.dataset!r}, {self.split!r}, {len(self)} records)"


def open_split(dataset: str, split: str, data_dir: str | None = None) -> RecordSource:
  """Random-access source over ``split`` of ``dataset`` (see the module docstring)."""
  return RecordSource(dataset, split, data_dir)
