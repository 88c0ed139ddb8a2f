"""Shared pieces of the checkpoint converters: a tracked state dict and layout transforms.

A converter reads tensors from a :class:`Checkpoint` (the checkpoint's own names, numpy arrays
in PyTorch layouts) and writes mmret parameters into a :class:`Assignment` ('/'-joined mmret
paths). Both record what went wrong instead of stopping at the first problem, so one error can
list every missing key and every mismatched parameter.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np


class Checkpoint:
  """A flat state dict {name: array} that remembers which names were read and which were absent."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str):
    self.tensors = tensors
    self.source = source
    self.used: set[str] = set()
    self.missing: list[str] = []

  def has(self, name: str) -> bool:
    return name in self.tensors

  def take(self, name: str):
    """The tensor ``name`` as float32 numpy, or None (recorded as missing) when absent."""
    if name not in self.tensors:
      self.missing.append(name)
      return None
    self.used.add(name)
    return np.asarray(self.tensors[name], np.float32)

  def count(self, pattern: str) -> int:
    """Number of distinct values of the first group of regex ``pattern`` over the names."""
    found = {m.group(1) for name in self.tensors if (m := re.match(pattern, name))}
    return len(found)

  def unused(self, prefixes: Iterable[str], ignore: Iterable[str] = ()) -> list[str]:
    """Names under ``prefixes`` that no converter read, except those matching ``ignore``."""
    prefixes, ignore = tuple(prefixes), tuple(ignore)
    return sorted(
        name
        for name in self.tensors
        if name.startswith(prefixes)
        and name not in self.used
        and not any(re.search(p, name) for p in ignore)
    )


class Assignment(dict):
  """{mmret parameter path: array}; None values (from missing tensors) are dropped."""

  def put(self, path: str, value) -> None:
    if value is not None:
      self[path] = value

  def linear(self, path: str, ckpt: Checkpoint, name: str, *, bias: bool = True) -> None:
    """torch Linear ``name`` [out, in] -> flax Dense ``path`` (kernel [in, out], bias)."""
    self.put(f"{path}/kernel", transpose(ckpt.take(f"{name}.weight")))
    if bias:
      self.put(f"{path}/bias", ckpt.take(f"{name}.bias"))

  def layer_norm(self, path: str, ckpt: Checkpoint, name: str) -> None:
    self.put(f"{path}/scale", ckpt.take(f"{name}.weight"))
    self.put(f"{path}/bias", ckpt.take(f"{name}.bias"))


def transpose(x):
  return None if x is None else np.ascontiguousarray(x.T)


def conv_kernel(x):
  """torch Conv2d weight [out, in/groups, kh, kw] -> flax Conv kernel [kh, kw, in/groups, out]."""
  return None if x is None else np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def split_qkv(w):
  """A fused [3w, ...] in-projection (OpenAI CLIP) -> (query, key, value)."""
  return (None, None, None) if w is None else tuple(np.split(w, 3, axis=0))


def strip_prefix(tensors: dict, prefixes: Iterable[str]) -> dict:
  """Removes the first of ``prefixes`` that every name starts with (e.g. 'module.', 'bert.')."""
  for prefix in prefixes:
    if tensors and all(k.startswith(prefix) for k in tensors):
      return {k[len(prefix) :]: v for k, v in tensors.items()}
  return tensors


def fit_text_positions(pos, length: int):
  """Position table [T, w] -> [1, length, w], keeping the first ``length`` rows (T >= length).

  A shorter table is returned whole, for the shape check to report.
  """
  if pos is None:
    return None
  pos = pos.reshape(-1, pos.shape[-1])
  return (pos[:length] if pos.shape[0] >= length else pos)[None]


def cubic_resize_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out, in] bicubic interpolation weights, as torch's interpolate(mode='bicubic',
  align_corners=False) computes them (cubic convolution with a=-0.75, edge indices clamped,
  no antialiasing), the resize the reference ViT/DINOv2 implementations apply."""
  scale = in_size / out_size
  src = (np.arange(out_size) + 0.5) * scale - 0.5
  base = np.floor(src).astype(int)
  t = src - base
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  matrix = np.zeros((out_size, in_size), np.float64)
  for k in range(4):
    np.add.at(matrix, (np.arange(out_size), np.clip(base - 1 + k, 0, in_size - 1)), weights[:, k])
  return matrix


def fit_image_positions(pos, tokens: int, prefix: int = 1):
  """Position table [(prefix +) g*g, w] -> [1, tokens, w], resizing the g x g grid (bicubic).

  ViTs are pretrained at one image size; another size needs the grid of patch positions
  interpolated, as the reference implementations do (and with the same weights). Shapes that
  cannot be fitted are returned unchanged, for the shape check to report.
  """
  if pos is None:
    return None
  pos = pos.reshape(-1, pos.shape[-1])
  if pos.shape[0] == tokens:
    return pos[None]
  old, new = pos.shape[0] - prefix, tokens - prefix
  old_side, new_side = int(round(old**0.5)), int(round(new**0.5))
  if old_side**2 != old or new_side**2 != new or new <= 0:
    return pos[None]
  resize = cubic_resize_matrix(old_side, new_side)
  grid = pos[prefix:].reshape(old_side, old_side, -1).astype(np.float64)
  grid = np.einsum("oi,ijc,pj->opc", resize, grid, resize).astype(np.float32)
  return np.concatenate([pos[:prefix], grid.reshape(new, -1)], axis=0)[None]


def identity_if_square(shape):
  """An identity projection when ``shape`` is square (embedding = tower output), else None."""
  if shape is None or len(shape) != 2 or shape[0] != shape[1]:
    return None
  return np.eye(shape[0], dtype=np.float32)
