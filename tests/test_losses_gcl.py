"""GCL, pairwise and CL losses: numpy references; sharded == single-device, forward and gradient."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from sharding import N_DEVICES, assert_sharded_equals_single

from mmret import registry
from mmret.losses import gcl

KEYS = ("z_image", "z_text", "z_joint")


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeddings(n, d=6, seed=0):
  rng = np.random.default_rng(seed)
  return {k: _normalize(rng.normal(size=(n, d))).astype(np.float32) for k in KEYS}


def _gcl_reference(z, tau, drop_other_positive):
  """The GCL formula with explicit loops, float64."""
  e = [np.asarray(z[k], np.float64) for k in KEYS]
  n = e[0].shape[0]
  total, count = 0.0, 0
  for j in range(n):
    for a, b in itertools.permutations(range(3), 2):
      (c,) = set(range(3)) - {a, b}
      denominator = 0.0
      for m in range(3):
        for k in range(n):
          if m == a and k == j:
            continue
          if drop_other_positive and m == c and k == j:
            continue
          denominator += np.exp(e[a][j] @ e[m][k] / tau)
      total += -np.log(np.exp(e[a][j] @ e[b][j] / tau) / denominator)
      count += 1
  return total / count


def _pairwise_reference(z, tau):
  e = [np.asarray(z[k], np.float64) for k in KEYS]
  n = e[0].shape[0]
  terms = []
  for a, b in itertools.permutations(range(3), 2):
    term = 0.0
    for j in range(n):
      logits = np.array([e[a][j] @ e[b][k] / tau for k in range(n)])
      term += -(logits[j] - np.log(np.sum(np.exp(logits))))
    terms.append(term / n)
  return np.mean(terms)


@pytest.mark.parametrize("drop_other_positive", [False, True])
def test_gcl_matches_reference(drop_other_positive):
  z = _embeddings(5)
  loss, metrics = gcl.gcl_loss(z, {}, temperature=0.1, drop_other_positive=drop_other_positive)
  np.testing.assert_allclose(loss, _gcl_reference(z, 0.1, drop_other_positive), rtol=1e-5)
  assert 0.0 <= metrics["acc_same_sample"] <= 1.0


def test_gcl_uses_learnable_scale_and_drop_flag_lowers_loss():
  z = _embeddings(4, seed=1)
  outputs = dict(z, logit_scale=jnp.log(1 / 0.07))
  literal, _ = gcl.gcl_loss(outputs, {})
  np.testing.assert_allclose(literal, _gcl_reference(z, 0.07, False), rtol=1e-5)
  dropped, _ = gcl.gcl_loss(outputs, {}, drop_other_positive=True)
  # Removing a positive term from every denominator can only lower each term.
  assert dropped < literal


def test_pairwise_matches_reference():
  z = _embeddings(5, seed=2)
  loss, metrics = gcl.pairwise_loss(z, {}, temperature=0.2)
  np.testing.assert_allclose(loss, _pairwise_reference(z, 0.2), rtol=1e-5)
  assert {"loss_i2t", "loss_t2it", "loss_it2i"} <= set(metrics)


def test_registry_and_cl_is_clip():
  assert registry.loss("gcl") is gcl.gcl_loss
  assert registry.loss("pairwise") is gcl.pairwise_loss
  assert registry.loss("cl") is registry.loss("clip")


def test_perfect_alignment_gives_low_loss():
  z = _embeddings(4, d=8, seed=3)
  same = {k: z["z_image"] for k in KEYS}
  # All modalities of a sample identical: with the other positive dropped, each denominator is the
  # positive plus other samples' far-away embeddings, so the loss nears zero at low temperature.
  loss, _ = gcl.gcl_loss(same, {}, temperature=0.01, drop_other_positive=True)
  assert loss < 0.05


def _sharded_equals_single(loss_fn, n_per_device=2, d=6, **hparams):
  """Loss and gradient w.r.t. a linear map producing the embeddings: 8 devices vs one."""
  n = N_DEVICES * n_per_device
  rng = np.random.default_rng(7)
  inputs = {k: rng.normal(size=(n, 5)).astype(np.float32) for k in KEYS}
  weights = {k: rng.normal(size=(5, d)).astype(np.float32) for k in KEYS}

  def loss_of(w, x, axis_name=None):
    outputs = {k: x[k] @ w[k] for k in KEYS}
    outputs = {k: v / jnp.linalg.norm(v, axis=-1, keepdims=True) for k, v in outputs.items()}
    return loss_fn(outputs, {}, axis_name=axis_name, **hparams)[0]

  assert_sharded_equals_single(loss_of, weights, inputs)


@pytest.mark.parametrize(
    "name,hparams",
    [
        ("gcl", {"temperature": 0.1}),
        ("gcl", {"temperature": 0.1, "drop_other_positive": True}),
        ("pairwise", {"temperature": 0.1}),
    ],
)
def test_sharded_equals_single_device(name, hparams):
  _sharded_equals_single(registry.loss(name), **hparams)
