"""The training stream's per-epoch shuffle: grain's permutation, computed a block at a time.

Grain's ``MapDataset.shuffle`` maps each position through a 4-round Simon block cipher over at
least 16 bits and walks the cycle until the result lands in ``[0, len)``. On a dataset of a
few hundred records that is ~65536 / len encryptions per element, one element at a time (about
0.1 ms each for the 512-record world: a fifth of the cost of decoding the example).
:class:`EpochShuffle` computes the same permutation, bit for bit, for a whole block of positions
at once in numpy and keeps the last blocks, so a stream, its checkpoints and every figure
measured on it are unchanged, at a few microseconds per element.
"""

from __future__ import annotations

import collections
import math
import threading

import grain
import numpy as np

__all__ = ["EpochShuffle", "index_shuffle", "round_keys"]

_MIN_BLOCK_BITS = 16  # grain's smallest cipher block (smaller ones showed patterns)
_MASK32 = 0xFFFFFFFF
_TABLE_BITS = 20  # domains up to 2**20 are encrypted whole (8 MiB) and walked by table lookups


def round_keys(seed: int, rounds: int) -> list[int]:
  """``rounds`` 32-bit words of C++'s ``std::seed_seq{seed}.generate`` (grain's key schedule)."""
  n, s, values = rounds, 1, [seed & _MASK32]
  out = [0x8B8B8B8B] * n
  t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
  p = (n - t) // 2
  q = p + t
  m = max(s + 1, n)

  def mix(x):
    return (x ^ (x >> 27)) & _MASK32

  for k in range(m):
    r1 = (1664525 * mix(out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n])) & _MASK32
    if k == 0:
      r2 = r1 + s
    elif k <= s:
      r2 = r1 + k % n + values[k - 1]
    else:
      r2 = r1 + k % n
    r2 &= _MASK32
    out[(k + p) % n] = (out[(k + p) % n] + r1) & _MASK32
    out[(k + q) % n] = (out[(k + q) % n] + r2) & _MASK32
    out[k % n] = r2
  for k in range(m, m + n):
    r3 = (1566083941 * mix((out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & _MASK32)) & _MASK32
    r4 = (r3 - k % n) & _MASK32
    out[(k + p) % n] ^= r3
    out[(k + q) % n] ^= r4
    out[k % n] = r4
  return out


def _block_bits(max_index: int) -> int:
  bits = int(math.ceil(math.log2(float(max_index))))
  return max(bits + bits % 2, _MIN_BLOCK_BITS)


def _encrypt(values: np.ndarray, keys: list[int], half: int) -> np.ndarray:
  """Simon encryption (word size ``half`` bits) of every value: a permutation of [0, 4**half)."""
  mask = np.uint64((1 << half) - 1)

  def rotl(x, r):
    return ((x << np.uint64(r)) | (x >> np.uint64(half - r))) & mask

  def f(x):
    return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

  left, right = (values >> np.uint64(half)) & mask, values & mask
  for i in range(0, len(keys), 2):
    left = left ^ f(right) ^ (np.uint64(keys[i]) & mask)
    right = right ^ f(left) ^ (np.uint64(keys[i + 1]) & mask)
  return (left << np.uint64(half)) | right


def index_shuffle(indices, max_index: int, seed: int, rounds: int = 4) -> np.ndarray:
  """Where grain's ``index_shuffle`` sends each of ``indices`` in a permutation of
  [0, max_index] (vectorised; the same values as grain's one-at-a-time C++ function)."""
  if rounds < 4 or rounds % 2:
    raise ValueError(f"rounds must be even and >= 4, got {rounds}")
  indices = np.asarray(indices, np.uint64)
  if max_index == 0:
    return np.zeros(indices.shape, np.int64)
  if indices.size and int(indices.max()) > max_index:
    raise ValueError(f"indices must lie in [0, {max_index}], got {int(indices.max())}")
  keys, bits = round_keys(seed, rounds), _block_bits(max_index)
  limit = np.uint64(max_index)
  if bits <= _TABLE_BITS:
    # A small domain: encrypt all of it once, then walk by pointer doubling. ``jump[y]`` is y
    # when y is in [0, max_index], else the value 2**k encryptions on (or the first in-range
    # one before that); a walk from x ends at the fixed point reached from E(x). Cycles with
    # no in-range value never settle, so only the walks asked for are checked.
    domain = np.arange(1 << bits, dtype=np.uint64)
    table = _encrypt(domain, keys, bits // 2).astype(np.int64)
    jump = np.where(domain <= limit, domain.astype(np.int64), table)
    out = jump[table[indices.astype(np.int64)]]
    while (out > max_index).any():
      jump = jump[jump]
      out = jump[out]
    return out
  out = _encrypt(indices, keys, bits // 2)
  outside = np.flatnonzero(out > limit)
  while outside.size:  # cycle-walk the values that left the range
    out[outside] = _encrypt(out[outside], keys, bits // 2)
    outside = outside[out[outside] > limit]
  return out.astype(np.int64)


class EpochShuffle(grain.MapDataset):
  """``parent`` shuffled anew each epoch: element ``i`` is grain's
  ``parent.shuffle(seed=seed)[i]``; positions past one epoch take the next epoch's order.

  The permutation is computed ``block`` positions at a time (by default a whole epoch of up to
  ~500k records, 65536 positions of larger ones) and the last two blocks are kept (8 bytes per
  position), so memory stays bounded whatever the dataset's length.
  """

  def __init__(self, parent: grain.MapDataset, *, seed: int, block: int | None = None):
    super().__init__(parent)
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
    if block is None:  # a whole epoch when its cipher domain is tabulated, else 65536
      small = len(parent) < 2 or _block_bits(len(parent) - 1) <= _TABLE_BITS
      block = max(len(parent), 1) if small else 1 << 16
    if block < 1:
      raise ValueError(f"block must be >= 1, got {block}")
    self._seed, self._block = int(seed), int(block)
    self._blocks = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def __getstate__(self):  # worker processes rebuild the block cache
    state = self.__dict__.copy()
    state["_blocks"], state["_lock"] = collections.OrderedDict(), None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _shuffled_block(self, epoch: int, start: int) -> np.ndarray:
    key = (epoch, start)
    with self._lock:
      if key in self._blocks:
        self._blocks.move_to_end(key)
        return self._blocks[key]
    length = len(self._parent)
    positions = np.arange(start, min(start + self._block, length))
    shuffled = index_shuffle(positions, length - 1, (self._seed + epoch) % 2**32)
    with self._lock:
      self._blocks[key] = shuffled
      while len(self._blocks) > 2:
        self._blocks.popitem(last=False)
    return shuffled

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    length = len(self._parent)
    epoch, position = divmod(int(index), length)
    start = position - position % self._block
    shuffled = int(self._shuffled_block(epoch, start)[position - start])
    return self._parent[shuffled + epoch * length]
