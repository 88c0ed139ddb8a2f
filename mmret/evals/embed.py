"""The embedding pass: items -> batches -> a jitted model over all local devices -> [N, ...].

Batches come from ``mmret.data.pipeline.eval_batches`` (or any function with its signature):
numpy dicts with the model inputs, ``valid`` bool [B] (False on padding rows) and ``index``
int32 [B] (position of the row's item in ``items``, -1 on padding). Each batch is split over a 1-D
mesh of this process's devices; processes embed their own shards and the results are gathered
with ``process_allgather`` and put back in item order.
"""

import collections
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mmret import progress

# The output key holding the embedding of each record modality.
EMBEDDING_KEYS = {"image": "z_image", "text": "z_text", "image,text": "z_joint"}
MESH_AXIS = "data"
# Embedding batches dispatched ahead of the one being read back (accelerators only).
IN_FLIGHT = 2

# predict_fn(params, batch) -> model outputs dict (see mmret.models.retrieval).
PredictFn = Callable[[Any, dict], dict]


def embedding_key(modality: str) -> str:
  if modality not in EMBEDDING_KEYS:
    raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(EMBEDDING_KEYS)}")
  return EMBEDDING_KEYS[modality]


def local_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over this process's devices (embedding needs no cross-process collectives)."""
  return jax.make_mesh(
      (jax.local_device_count(),),
      (MESH_AXIS,),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=jax.local_devices(),
  )


def _select(predict_fn: PredictFn, keys: tuple[str, ...]):
  """predict_fn reduced to some of its outputs (each with one row per example)."""

  def selected(params, batch):
    outputs = predict_fn(params, batch)
    missing = [key for key in keys if key not in outputs]
    if missing:
      raise KeyError(
          f"the model returned no {missing} (outputs: {sorted(outputs)}); "
          f"check that the batch carries the inputs they need"
      )
    return {key: outputs[key] for key in keys}

  return selected


@functools.lru_cache(maxsize=64)
def _jitted_outputs(predict_fn: PredictFn, keys: tuple[str, ...]):
  """:func:`_select` jitted once per (function, keys): evaluations reuse the compiled pass."""
  return jax.jit(_select(predict_fn, keys))


def _replicate(params, mesh):
  """Places params on every device of ``mesh``, taking the local copy of replicated globals."""

  def local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return x

  return jax.device_put(jax.tree.map(local, params), NamedSharding(mesh, P()))


def _pad_rows(batch: dict, multiple: int) -> dict:
  """Pads every array of the batch to a row count divisible by ``multiple`` (padding invalid)."""
  size = len(batch["valid"])
  extra = -size % multiple
  if extra == 0:
    return batch
  padded = {}
  for name, value in batch.items():
    value = np.asarray(value)
    fill = -1 if name == "index" else 0
    pad = np.full((extra,) + value.shape[1:], fill, value.dtype)
    padded[name] = np.concatenate([value, pad])
  return padded


def _default_batches_fn():
  from mmret.data import pipeline  # The data package owns decoding and tokenisation.

  return pipeline.eval_batches


def embed_items(
    predict_fn: PredictFn, items: Sequence[dict], modality: str, **kwargs
) -> np.ndarray:
  """Embeds ``items`` with the output of ``modality`` and returns [len(items), d] in item order.

  ``modality`` is 'image', 'text' or 'image,text' and picks ``z_image``, ``z_text`` or ``z_joint``;
  the keyword arguments are :func:`item_outputs`' (``input_cfg`` and ``batch_size`` required).
  """
  key = embedding_key(modality)
  return item_outputs(predict_fn, items, (key,), **kwargs)[key]


def item_outputs(
    predict_fn: PredictFn,
    items: Sequence[dict],
    keys: Sequence[str],
    *,
    input_cfg: Any,
    batch_size: int,
    params: Any = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    batches_fn: Optional[Callable] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    in_flight: Optional[int] = None,
) -> dict[str, np.ndarray]:
  """The model outputs ``keys`` of every item: {key: [len(items), ...]} in item order (float32).

  Args:
    predict_fn: ``predict_fn(params, batch) -> outputs`` (pure; jitted here, so create it once and
      reuse it: a new function object compiles anew).
    items: records for ``eval_batches`` (e.g. ``{'image': bytes}``, ``{'text': str}`` or both).
    keys: the outputs to keep, each with one row per example (e.g. ``z_image``, ``image_tokens``).
    input_cfg, batch_size: passed to ``batches_fn``; batch_size is per process.
    params: model parameters passed to predict_fn (replicated over the mesh).
    mesh: 1-D device mesh splitting each batch; defaults to all local devices.
    batches_fn: ``eval_batches``-compatible batch source; defaults to mmret.data.pipeline's.
    in_flight: batches dispatched ahead of the one whose outputs are being read back; default
      ``IN_FLIGHT`` on accelerators, 0 on the CPU.
  """
  keys = tuple(keys)
  mesh = mesh or local_mesh()
  batches_fn = batches_fn or _default_batches_fn()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  run = _jitted_outputs(predict_fn, keys)
  params = _replicate(params, mesh)
  row_sharding = NamedSharding(mesh, P(MESH_AXIS))
  chunks, chunk_indices = {key: [] for key in keys}, []
  # Batches dispatched before the oldest one's outputs are fetched: accelerators embed the next
  # batches while the host reads back and prepares; on the CPU one program at a time, which also
  # avoids the rendezvous stalls of back-to-back sharded programs there.
  if in_flight is None:
    in_flight = 0 if jax.local_devices()[0].platform == "cpu" else IN_FLIGHT
  pending = collections.deque()

  def collect(device_outputs, valid, index):
    outputs = jax.device_get(device_outputs)
    for key in keys:
      chunks[key].append(np.asarray(outputs[key], np.float32)[valid])
    chunk_indices.append(index[valid])
    counter.update()  # counted on the host, after the outputs above came back

  share = -(-len(items) // process_count)  # eval_batches' batches per process (the largest share)
  counter = progress.Progress(
      f"embedding {len(items)} items ({', '.join(keys)})",
      -(-share // batch_size),
      unit="batches",
      warmup=True,
  )
  for batch in batches_fn(
      items,
      input_cfg=input_cfg,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
  ):
    for required in ("valid", "index"):
      if required not in batch:
        raise KeyError(f"eval batch lacks {required!r} (keys: {sorted(batch)})")
    batch = _pad_rows(dict(batch), mesh.size)
    valid = np.asarray(batch.pop("valid"), bool)
    index = np.asarray(batch.pop("index"), np.int64)
    # Only numeric arrays go to the devices (a batch may also carry ids or raw strings).
    inputs = {
        name: value
        for name, value in batch.items()
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf"
    }
    inputs = jax.device_put(inputs, row_sharding)
    inputs["valid"] = jax.device_put(valid, row_sharding)
    pending.append((run(params, inputs), valid, index))  # dispatched; not waited for
    if len(pending) > in_flight:
      collect(*pending.popleft())
  while pending:
    collect(*pending.popleft())
  counter.finish()
  if not chunk_indices:  # no items: every process yields no batch
    return {key: np.zeros((0, 0), np.float32) for key in keys}
  local_index = np.concatenate(chunk_indices)
  out = {}
  for key in keys:
    local = np.concatenate(chunks[key])
    gathered, all_index = _gather_processes(
        local.reshape(len(local), -1), local_index, process_count
    )
    out[key] = _restore_order(gathered, all_index, len(items)).reshape(
        (len(items),) + local.shape[1:]
    )
  return out


def _gather_processes(z: np.ndarray, index: np.ndarray, process_count: int):
  """Concatenates every process's (embeddings, indices); shards may differ in length."""
  if process_count == 1:
    return z, index
  counts = np.asarray(multihost_utils.process_allgather(np.int64(len(index)))).reshape(-1)
  widths = np.asarray(multihost_utils.process_allgather(np.int64(z.shape[1]))).reshape(-1)
  longest, width = int(counts.max()), int(widths.max())
  padded_z = np.zeros((longest, width), np.float32)
  padded_z[: len(z), : z.shape[1]] = z
  padded_index = np.full((longest,), -1, np.int64)
  padded_index[: len(index)] = index
  gathered_z = np.asarray(multihost_utils.process_allgather(padded_z))
  gathered_index = np.asarray(multihost_utils.process_allgather(padded_index))
  keep = [slice(0, int(c)) for c in counts]
  return (
      np.concatenate([g[s] for g, s in zip(gathered_z, keep)]),
      np.concatenate([g[s] for g, s in zip(gathered_index, keep)]),
  )


def _restore_order(z: np.ndarray, index: np.ndarray, num_items: int) -> np.ndarray:
  """Scatters rows to their item positions, checking each item came back exactly once."""
  if num_items == 0:
    return np.zeros((0, z.shape[1] if z.ndim == 2 else 0), np.float32)
  if len(index) and (index.min() < 0 or index.max() >= num_items):
    raise ValueError(f"eval batches returned item indices outside 0..{num_items - 1}")
  counts = np.bincount(index, minlength=num_items)
  if (counts != 1).any():
    missing = np.flatnonzero(counts == 0)[:5].tolist()
    repeated = np.flatnonzero(counts > 1)[:5].tolist()
    raise ValueError(
        f"eval batches must return every item once; missing items {missing}, "
        f"repeated items {repeated} (first five of each)"
    )
  ordered = np.empty((num_items, z.shape[1]), np.float32)
  ordered[index] = z
  return ordered
