"""Random-access record sources over prepared tensorflow-datasets (ArrayRecord) datasets.

A dataset is named either by a registered tfds name with config (``mmret_world/tiny``: the
embedded world, prepared offline on first use) or by the path of a prepared tfds dataset
directory (the one holding ``dataset_info.json``). Records come back as plain dicts: ``image``
stays encoded bytes (or the decoded array a ``tfds.features.Image`` gives), every other bytes
value becomes ``str`` and lists of bytes become lists of ``str``.

tfds gives all splits of a dataset one feature set. A builder whose module defines
``SPLIT_FIELDS`` (split name -> field names, as ``mmret.data.world_builder`` does) has its
records cut down to their split's own fields, so a record's keys say what it holds.

Records whose fields are all tensors (``Text``, ``Scalar``, ``Tensor`` with or without zlib
encoding, and ``Sequence`` of those: every mmret dataset) are decoded by :class:`ExampleDecoder`,
which parses only the split's fields and gives the values tfds' generic decoding gives; other
features (``Image``, nested dicts, ragged sequences) go through tfds' decoding.

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

__all__ = [
    "default_data_dir",
    "load_builder",
    "open_split",
    "dataset_metadata",
    "ExampleDecoder",
    "RecordSource",
]

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


class ExampleDecoder:
  """Decodes serialized ``tf.train.Example`` records to chosen fields' values as tfds gives them.

  Each field's proto values become a numpy array of its serialized dtype and shape (a scalar
  shape gives the Python value) and then go through the feature's own numpy decoding, as in
  tfds' generic path, but only for the chosen fields and without its per-key bookkeeping.
  ``plans`` holds, per field: its name, its ``(proto key, sub-key, TensorInfo)`` entries (one
  per serialized tensor), whether its values go to the decoding as a dict by sub-key (an encoded
  tensor's ``shape`` and ``value``) and the feature method that decodes them.
  """

  def __init__(self, plans):
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel

    self.plans = plans
    self._parse = tf_example_pb2.Example.FromString

  @classmethod
  def for_fields(cls, features, fields) -> "ExampleDecoder | None":
    """The decoder of ``fields`` of the ``FeaturesDict`` ``features``; None when a field's
    feature is not a tensor or a non-nested sequence of tensors."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    plans = []
    for field in sorted(fields):
      feature = features[field]
      if isinstance(feature, tfds.features.Tensor):
        decode, rank = feature.decode_example_np, 0
      elif isinstance(feature, tfds.features.Sequence) and isinstance(
          feature.feature, tfds.features.Tensor
      ):
        decode, rank = feature.feature.decode_batch_example_np, 1
      else:
        return None
      info = feature.get_serialized_info()
      nested = isinstance(info, dict)
      if nested:
        entries = [(f"{field}/{sub}", sub, sub_info) for sub, sub_info in info.items()]
      else:
        entries = [(field, None, info)]
      for _, _, tensor_info in entries:
        if not hasattr(tensor_info, "np_dtype"):  # a nested dict: not a plain tensor
          return None
        if tensor_info.sequence_rank != rank or tensor_info.dataset_lvl:
          return None
      plans.append((field, entries, nested, decode))
    return cls(plans)

  def __call__(self, serialized: bytes) -> dict[str, Any]:
    proto = self._parse(serialized).features.feature
    record = {}
    for field, entries, nested, decode in self.plans:
      values = {}
      for key, sub, tensor_info in entries:
        if key not in proto:
          raise KeyError(f"feature {key!r} is not in the serialized example")
        values[sub] = _proto_values(proto[key], tensor_info, key)
      record[field] = decode(values if nested else values[None])
    return record


def _proto_values(feature, tensor_info, key: str) -> Any:
  """One ``tf.train.Feature`` as a numpy array of ``tensor_info``'s dtype and shape."""
  kind = feature.WhichOneof("kind")
  if kind is None:
    raise ValueError(f"feature {key!r} holds no value list")
  # A list first: numpy reads the proto's repeated field element by element otherwise.
  array = np.array(list(getattr(feature, kind).value), dtype=tensor_info.np_dtype)
  if not tensor_info.shape:
    return array.item()
  return array.reshape([-1 if d is None else d for d in tensor_info.shape])


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
    # The fast decoder of the split's fields, or None: tfds decodes records.
    self.decoder = ExampleDecoder.for_fields(builder.info.features, self.fields)
    if self.decoder is not None:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

      raw = tfds.decode.DeserializeMethod.RAW_BYTES
      self._records = builder.as_data_source(split, deserialize_method=raw)
    else:
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
    index = int(index)
    if not -len(self) <= index < len(self):  # ArrayRecord says ValueError; sequences need this
      raise IndexError(f"record {index} of {self!r}")
    index %= len(self)
    try:
      record = self._records[index]
      if self.decoder is not None:
        record = self.decoder(record)
    except IndexError:
      raise
    except Exception as e:  # ArrayRecord/Riegeli raise RuntimeError for damaged files
      raise RecordReadError(
          f"dataset {self.dataset!r}, split {self.split!r}: record {index} cannot be read from "
          f"{self._file_of(index)} ({type(e).__name__}: {e}). The file may be truncated or "
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
