"""SelfAlign pieces vs numpy references; Sinkhorn marginals; sharded == single-device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharding import assert_sharded_equals_single

from mmret import ops, registry
from mmret.losses import vsepp
from mmret.recipes.selfalign import losses as selfalign
from mmret.recipes.selfalign import method as selfalign_method
from mmret.recipes.selfalign.sinkhorn import sinkhorn


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _features(n=4, n_regions=5, n_words=6, d=8, k=7, seed=0):
  rng = np.random.default_rng(seed)
  text_mask = np.ones((n, n_words), bool)
  for b in range(n):
    text_mask[b, rng.integers(2, n_words + 1) :] = False  # at least two real words
  return {
      "z_image": _normalize(rng.normal(size=(n, d))).astype(np.float32),
      "z_text": _normalize(rng.normal(size=(n, d))).astype(np.float32),
      "image_tokens": rng.normal(size=(n, n_regions, d)).astype(np.float32),
      "text_tokens": rng.normal(size=(n, n_words, d)).astype(np.float32),
      "text_mask": text_mask,
      "prototypes": rng.normal(size=(k, d)).astype(np.float32),
  }


# --- numpy references (float64, loops) ------------------------------------------------------------


def _vsepp_reference(za, zb, margin, max_violation):
  za, zb = np.float64(za), np.float64(zb)
  n = len(za)
  total = 0.0
  for x, y in ((za, zb), (zb, za)):
    for i in range(n):
      costs = [max(0.0, margin + x[i] @ y[j] - x[i] @ y[i]) for j in range(n) if j != i]
      total += (max(costs) if max_violation else sum(costs)) / n
  return total


def _sinkhorn_reference(scores, epsilon, iterations):
  q = np.exp(np.float64(scores) / epsilon).T  # [K,S]
  k, s = q.shape
  q /= q.sum()
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= s
  return (q * s).T


def _concept_reference(f, epsilon, iterations, temperature):
  protos = _normalize(np.float64(f["prototypes"]))
  regions = _normalize(np.float64(f["image_tokens"]))
  words = _normalize(np.float64(f["text_tokens"]))
  n, p, _ = regions.shape
  q = _sinkhorn_reference(regions.reshape(n * p, -1) @ protos.T, epsilon, iterations)
  q = q.reshape(n, p, -1)
  total, count = 0.0, 0
  for b in range(n):
    for l in range(words.shape[1]):
      if not f["text_mask"][b, l]:
        continue
      best = np.argmax([words[b, l] @ regions[b, r] for r in range(p)])
      logits = words[b, l] @ protos.T / temperature
      log_prob = logits - np.log(np.sum(np.exp(logits)))
      total += -np.sum(q[b, best] * log_prob)
      count += 1
  return total / count


def _context_nce_reference(g, locals_, mask, temperature, num_negatives):
  g, locals_ = _normalize(np.float64(g)), _normalize(np.float64(locals_))
  n = len(g)
  anchor_losses = []
  for i in range(n):
    negatives = sorted(
        (
            g[i] @ locals_[j, t] / temperature
            for j in range(n)
            if j != i
            for t in range(locals_.shape[1])
            if mask[j, t]
        ),
        reverse=True,
    )
    negatives = np.array(negatives[:num_negatives])
    terms = []
    for t in range(locals_.shape[1]):
      if mask[i, t]:
        s = g[i] @ locals_[i, t] / temperature
        terms.append(-(s - np.log(np.exp(s) + np.sum(np.exp(negatives)))))
    if terms:
      anchor_losses.append(np.mean(terms))
  return np.mean(anchor_losses)


def _context_vector_reference(g, locals_, mask, temperature):
  out = []
  for b in range(len(g)):
    valid = _normalize(np.float64(locals_[b][mask[b]]))
    logits = valid @ _normalize(np.float64(g[b])) / temperature
    w = np.exp(logits - logits.max())
    w /= w.sum()
    out.append(_normalize(w @ valid))
  return np.array(out)


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_violation", [True, False])
def test_vsepp_matches_reference(max_violation):
  f = _features(n=5)
  loss, metrics = vsepp.vsepp_loss(f, {}, max_violation=max_violation)
  np.testing.assert_allclose(
      loss, _vsepp_reference(f["z_image"], f["z_text"], 0.2, max_violation), rtol=1e-5
  )
  np.testing.assert_allclose(metrics["loss_i2t"] + metrics["loss_t2i"], loss, rtol=1e-6)


def test_vsepp_zero_when_positives_beat_negatives_by_margin():
  z = np.eye(4, dtype=np.float32)
  loss, _ = vsepp.vsepp_loss({"z_image": z, "z_text": z}, {}, margin=0.5)
  assert loss == 0.0


def test_sinkhorn_matches_reference_and_balances_marginals():
  rng = np.random.default_rng(1)
  scores = np.tanh(rng.normal(size=(24, 6))).astype(np.float32)
  q = np.asarray(sinkhorn(scores, epsilon=0.05, iterations=3))
  np.testing.assert_allclose(q, _sinkhorn_reference(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
  q = np.asarray(sinkhorn(scores, epsilon=0.05, iterations=200))
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)  # each sample: a distribution
  np.testing.assert_allclose(q.sum(axis=0), 24 / 6, rtol=1e-3)  # each prototype: equal mass
  # Few iterations leave the prototype marginal unbalanced on skewed scores.
  skewed = scores + np.linspace(0, 1, 6, dtype=np.float32)
  q1 = np.asarray(sinkhorn(skewed, epsilon=0.05, iterations=1))
  q200 = np.asarray(sinkhorn(skewed, epsilon=0.05, iterations=200))
  assert np.ptp(q1.sum(axis=0)) > 10 * np.ptp(q200.sum(axis=0))


def test_sinkhorn_has_no_gradient():
  scores = jnp.ones((4, 3)) * jnp.arange(3.0)
  grad = jax.grad(lambda s: jnp.sum(sinkhorn(s) * jnp.arange(3.0)))(scores)
  assert np.all(np.asarray(grad) == 0)


def test_concept_loss_matches_reference():
  f = _features(seed=2)
  loss = selfalign.concept_alignment_loss(
      f["image_tokens"],
      f["text_tokens"],
      f["text_mask"],
      f["prototypes"],
      epsilon=0.05,
      sinkhorn_iterations=3,
      temperature=0.1,
  )
  np.testing.assert_allclose(loss, _concept_reference(f, 0.05, 3, 0.1), rtol=1e-4)


@pytest.mark.parametrize("num_negatives", [512, 3])
def test_context_nce_matches_reference(num_negatives):
  f = _features(seed=3)
  loss = selfalign.context_nce(
      f["z_image"], f["text_tokens"], f["text_mask"], temperature=0.7, num_negatives=num_negatives
  )
  expected = _context_nce_reference(
      f["z_image"], f["text_tokens"], f["text_mask"], 0.7, num_negatives
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_context_nce_ignores_padding_content():
  f = _features(seed=4)
  changed = f["text_tokens"].copy()
  changed[~f["text_mask"]] = 100.0  # padded positions must not matter
  a = selfalign.context_nce(f["z_image"], f["text_tokens"], f["text_mask"])
  b = selfalign.context_nce(f["z_image"], changed, f["text_mask"])
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_context_vector_matches_reference():
  f = _features(seed=5)
  got = selfalign_method.context_vector(
      f["z_text"], f["text_tokens"], f["text_mask"], temperature=0.1
  )
  np.testing.assert_allclose(
      got,
      _context_vector_reference(f["z_text"], f["text_tokens"], f["text_mask"], 0.1),
      rtol=1e-4,
      atol=1e-6,
  )


def test_retrieval_vectors_reproduce_final_similarity():
  f = _features(n=6, seed=6)
  similarity = selfalign_method.selfalign_similarity(
      f["z_image"], f["image_tokens"], f["z_text"], f["text_tokens"], f["text_mask"]
  )
  image_side = selfalign_method.image_retrieval_vector(f["z_image"], f["image_tokens"])
  text_side = selfalign_method.text_retrieval_vector(f["z_text"], f["text_tokens"], f["text_mask"])
  np.testing.assert_allclose(image_side @ text_side.T, similarity, rtol=1e-5, atol=1e-6)
  # The explicit formula, pair by pair.
  ctx_i = _context_vector_reference(f["z_image"], f["image_tokens"], np.ones((6, 5), bool), 0.1)
  ctx_t = _context_vector_reference(f["z_text"], f["text_tokens"], f["text_mask"], 0.1)
  for i in range(6):
    for t in range(6):
      mean_i = _normalize(_normalize(np.float64(f["image_tokens"][i])).mean(0))
      mean_t = _normalize(_normalize(np.float64(f["text_tokens"][t][f["text_mask"][t]])).mean(0))
      expected = f["z_image"][i] @ f["z_text"][t] + 0.5 * (ctx_i[i] @ mean_t + mean_i @ ctx_t[t])
      np.testing.assert_allclose(similarity[i, t], expected, rtol=1e-4, atol=1e-5)


def test_selfalign_loss_is_weighted_sum_and_needs_prototypes():
  f = _features(seed=7)
  assert registry.method("selfalign").loss is selfalign.selfalign_loss
  loss, metrics = selfalign.selfalign_loss(f, {}, concept_weight=0.5, context_weight=2.0)
  np.testing.assert_allclose(
      loss,
      metrics["loss_vsepp"] + 0.5 * metrics["loss_concept"] + 2.0 * metrics["loss_context"],
      rtol=1e-6,
  )
  without = {k: v for k, v in f.items() if k != "prototypes"}
  with pytest.raises(KeyError, match="prototypes"):
    selfalign.selfalign_loss(without, {})
  assert registry.loss("vsepp") is vsepp.vsepp_loss


def _sharded_equals_single(loss_fn, features, rtol=1e-5, atol=1e-7):
  """loss_fn(params, features, axis_name): value and grad on 8 devices (pmean) vs one device."""
  params = {"scale": jnp.float32(1.3), "tokens": jnp.float32(0.8)}
  assert_sharded_equals_single(loss_fn, params, features, rtol=rtol, atol=atol)


def _scaled(params, f):
  """Embeddings depending on two scalar parameters, so gradients through every input are checked."""
  z_image = ops.l2_normalize(f["z_image"] + params["scale"] * f["z_text"])
  text_tokens = params["tokens"] * f["text_tokens"] + f["image_tokens"][:, :1]
  return dict(f, z_image=z_image, text_tokens=text_tokens)


def test_sharded_vsepp_equals_single_device():
  f = {k: v for k, v in _features(n=16, seed=8).items() if k != "prototypes"}

  def loss_fn(params, x, axis_name=None):
    return vsepp.vsepp_loss(_scaled(params, x), {}, axis_name=axis_name, margin=0.5)[0]

  _sharded_equals_single(loss_fn, f)


def test_sharded_context_loss_equals_single_device():
  num_negatives = 5  # fewer than exist: the hardest are picked among all devices' locals
  f = {k: v for k, v in _features(n=16, seed=9).items() if k != "prototypes"}
  f["text_mask"][3] = False  # an anchor with no valid word is left out of the mean

  def loss_fn(params, x, axis_name=None):
    x = _scaled(params, x)
    return selfalign.context_alignment_loss(
        x["z_image"],
        x["z_text"],
        x["image_tokens"],
        x["text_tokens"],
        x["text_mask"],
        num_negatives=num_negatives,
        axis_name=axis_name,
    )

  _sharded_equals_single(loss_fn, f)


def test_sharded_concept_loss_equals_single_device():
  f = _features(n=16, seed=10)
  prototypes = f.pop("prototypes")

  def loss_fn(params, x, axis_name=None):
    x = _scaled(params, x)
    return selfalign.concept_alignment_loss(
        x["image_tokens"], x["text_tokens"], x["text_mask"], prototypes, axis_name=axis_name
    )

  _sharded_equals_single(loss_fn, f)
