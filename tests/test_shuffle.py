"""The training stream's shuffle against grain's own (its C++ ``index_shuffle``, one index at a
time): the same permutation, bit for bit, on every path (whole-domain table, block cipher with
cycle walking) and across block and epoch boundaries."""

import pickle

import grain
import numpy as np
import pytest
from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

from mmret.data import shuffle

# Lengths on both sides of the 16-bit minimum block, of odd bit counts, and past the table's
# 2**20 domain (the cipher path with cycle walking).
LENGTHS = [1, 2, 3, 7, 100, 512, 4097, 65536, 65537, 70000, 1 << 19, (1 << 20) + 5, 3_000_001]
SEEDS = [0, 1, 42, 123456789, 2**32 - 1]


@pytest.mark.parametrize("length", LENGTHS)
def test_index_shuffle_is_grains_permutation(length):
  rng = np.random.default_rng(length)
  for seed in SEEDS:
    indices = np.unique(rng.integers(0, length, 64))
    expected = [
        index_shuffle_module.index_shuffle(int(i), max_index=length - 1, seed=seed, rounds=4)
        for i in indices
    ]
    np.testing.assert_array_equal(shuffle.index_shuffle(indices, length - 1, seed), expected)


def test_index_shuffle_is_a_permutation_and_checks_its_arguments():
  for length in (5, 300, 70000):
    values = shuffle.index_shuffle(np.arange(length), length - 1, seed=9)
    np.testing.assert_array_equal(np.sort(values), np.arange(length))
  with pytest.raises(ValueError, match="rounds"):
    shuffle.index_shuffle([0], 10, seed=0, rounds=3)
  with pytest.raises(ValueError, match=r"\[0, 10\]"):
    shuffle.index_shuffle([11], 10, seed=0)


@pytest.mark.parametrize("length,block", [(250, None), (250, 64), (70000, 4096)])
def test_epoch_shuffle_equals_grains_shuffle_across_epochs(length, block):
  parent = grain.MapDataset.range(length)
  ours = shuffle.EpochShuffle(parent, seed=17, block=block)
  theirs = parent.shuffle(seed=17)
  # Three epochs of a short dataset (block edges included), or positions spread over two.
  positions = list(range(3 * length)) if length < 1000 else list(range(0, 2 * length, 37))
  assert [ours[i] for i in positions] == [theirs[i] for i in positions]
  # Worker processes receive the dataset pickled.
  again = pickle.loads(pickle.dumps(ours))
  assert [again[i] for i in positions[-50:]] == [theirs[i] for i in positions[-50:]]


def test_epoch_shuffle_checks_its_arguments():
  parent = grain.MapDataset.range(10)
  with pytest.raises(ValueError, match="seed"):
    shuffle.EpochShuffle(parent, seed=2**32)
  with pytest.raises(ValueError, match="block"):
    shuffle.EpochShuffle(parent, seed=0, block=0)
