"""Float64 numpy references of SOLAR's pieces, written from the method's formulas (loops, no JAX),
and a joint encoder stand-in simple enough to compute by hand: the normalised weighted mean of
the visible tokens."""

import jax.numpy as jnp
import numpy as np


def normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def gaussian_pdf(x, mean, var):
  return np.exp(-((x - mean) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)


def gaussian_crossing(mean_a, var_a, mean_b, var_b):
  """The point between the means where the two densities are equal (the midpoint for equal
  variances); found as a root of the difference of the log-densities."""
  if np.isclose(var_a, var_b, rtol=1e-9):
    return 0.5 * (mean_a + mean_b)
  quadratic = [
      1 / var_a - 1 / var_b,
      -2 * (mean_a / var_a - mean_b / var_b),
      mean_a**2 / var_a - mean_b**2 / var_b + np.log(var_a / var_b),
  ]
  roots = np.real(np.roots(quadratic))
  low, high = min(mean_a, mean_b), max(mean_a, mean_b)
  between = [r for r in roots if low <= r <= high]
  return between[0] if between else min(roots, key=lambda r: abs(r - 0.5 * (low + high)))


def mixture_em(positive, negative, iterations=30, min_variance=1e-6):
  """Two-Gaussian EM on the positive-pair scores (float64, written from the definition): the
  difference component starts at the negative scores' moments, the intersection component at the
  positive scores above their mean with weight = their fraction. Returns (threshold, mean_1,
  var_1, weight_1): the threshold is the root between the means of
  log(w1 N1) - log(w0 N0), found by bisection."""
  x = np.asarray(positive, np.float64).ravel()
  n = np.asarray(negative, np.float64).ravel()
  mean_0, var_0 = n.mean(), max(n.var(), min_variance)
  upper = x > x.mean()
  mean_1, var_1, w = x[upper].mean(), max(x[upper].var(), min_variance), upper.mean()

  def log_pdf(v, mean, var):
    return -0.5 * (np.log(2 * np.pi * var) + (v - mean) ** 2 / var)

  for _ in range(iterations):
    a = np.log(w) + log_pdf(x, mean_1, var_1)
    b = np.log(1 - w) + log_pdf(x, mean_0, var_0)
    r = 1.0 / (1.0 + np.exp(b - a))
    w = np.clip(r.mean(), 1e-6, 1 - 1e-6)
    mean_1 = np.sum(r * x) / r.sum()
    var_1 = max(np.sum(r * (x - mean_1) ** 2) / r.sum(), min_variance)
    mean_0 = np.sum((1 - r) * x) / (1 - r).sum()
    var_0 = max(np.sum((1 - r) * (x - mean_0) ** 2) / (1 - r).sum(), min_variance)
  f = lambda v: np.log(w) + log_pdf(v, mean_1, var_1) - np.log(1 - w) - log_pdf(v, mean_0, var_0)
  low, high = sorted((mean_0, mean_1))
  for _ in range(200):
    middle = 0.5 * (low + high)
    if (f(middle) > 0) == (f(high) > 0):
      high = middle
    else:
      low = middle
  return 0.5 * (low + high), mean_1, var_1, w


def intersection_threshold(tokens, mask, partner_global, min_variance=1e-6):
  """Crossing of the Gaussians fitted to own-partner and other-partner token cosines."""
  tokens, partner = normalize(tokens), normalize(partner_global)
  positive, negative = [], []
  for i in range(len(tokens)):
    for t in np.flatnonzero(mask[i]):
      positive.append(tokens[i, t] @ partner[i])
      negative.extend(tokens[i, t] @ partner[j] for j in range(len(tokens)) if j != i)
  positive, negative = np.array(positive), np.array(negative)
  return gaussian_crossing(
      positive.mean(),
      max(positive.var(), min_variance),
      negative.mean(),
      max(negative.var(), min_variance),
  )


def token_scores(tokens, partner_global):
  return np.einsum("btd,bd->bt", normalize(tokens), normalize(partner_global))


def gla(tokens, mask, partner, margin):
  tokens, partner = normalize(tokens), normalize(partner)
  n = len(tokens)
  hinges = []
  for i in range(n):
    valid = tokens[i][mask[i]]
    if not len(valid):
      continue
    positive = np.mean(valid @ partner[i])
    negative = np.mean([valid @ partner[j] for j in range(n) if j != i])
    hinges.append(max(0.0, negative + margin - positive))
  return np.mean(hinges)


def token_infonce(tokens, mask, partner, temperature):
  """Mean over every valid token of -log softmax over the partners at the token's own."""
  tokens, partner = normalize(tokens), normalize(partner)
  losses = []
  for i in range(len(tokens)):
    for t in np.flatnonzero(mask[i]):
      logits = partner @ tokens[i, t] / temperature
      losses.append(np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[i])
  return np.mean(losses) if losses else 0.0


def local_distillation(teacher, student, mask):
  corrs = []
  for b in range(len(teacher)):
    idx = np.flatnonzero(mask[b])
    t, s = normalize(teacher[b][idx]), normalize(student[b][idx])
    st, ss = t @ t.T, s @ s.T
    for k in range(len(idx)):
      others = [j for j in range(len(idx)) if j != k]
      if len(others) >= 2:
        corrs.append(np.corrcoef(st[k, others], ss[k, others])[0, 1])
  return 1 - np.mean(corrs)


def global_distillation(teacher_a, teacher_b, student_a, student_b, include_self=False):
  teacher = normalize(teacher_a) @ normalize(teacher_b).T
  student = normalize(student_a) @ normalize(student_b).T
  corrs = []
  for k in range(len(teacher)):
    columns = [j for j in range(teacher.shape[1]) if include_self or j != k]
    corrs.append(np.corrcoef(teacher[k, columns], student[k, columns])[0, 1])
  return 1 - np.mean(corrs)


def clip_infonce(za, zb, temperature):
  """Symmetric image<->text InfoNCE: mean over both directions of -log softmax of the diagonal."""
  logits = np.asarray(za, np.float64) @ np.asarray(zb, np.float64).T / temperature
  total = 0.0
  for matrix in (logits, logits.T):
    for i, row in enumerate(matrix):
      total += -(row[i] - np.log(np.sum(np.exp(row))))
  return total / (2 * len(logits))


def multi_positive(anchors, candidates, positives, negatives, temperature):
  out = []
  for i in range(len(anchors)):
    s = np.exp(np.float64(anchors[i]) @ np.float64(candidates).T / temperature)
    p = [j for j in range(len(candidates)) if positives[i, j]]
    pn = [j for j in range(len(candidates)) if positives[i, j] or negatives[i, j]]
    out.append(-np.log(s[p].sum() / s[pn].sum()) if p else 0.0)
  return np.array(out)


def stage2_contrastive(fa, fp, fn, has_pos, has_neg, temperature, symmetric):
  """SOLAR's stage-2 loss: the original's positive is its positive view; negatives are its own
  hard negative (when it has one) and every valid view of the other samples."""
  n = len(fa)
  candidates = np.concatenate([fa, fp, fn])
  valid_column = np.concatenate([np.ones(n, bool), has_pos, has_neg])
  losses = []
  for anchors, positive_view in ((fa, 1), (fp, 0))[: 2 if symmetric else 1]:
    for i in range(n):
      if not has_pos[i]:
        continue
      positives = np.zeros((1, 3 * n), bool)
      positives[0, positive_view * n + i] = True
      negatives = np.zeros((1, 3 * n), bool)
      for c in range(3 * n):
        sample, kind = c % n, c // n
        negatives[0, c] = valid_column[c] and (sample != i or (kind == 2 and has_neg[i]))
      losses.append(
          multi_positive(anchors[i : i + 1], candidates, positives, negatives, temperature)[0]
      )
  return np.mean(losses)


def pooled_joint(
    image_tokens=None, text_tokens=None, text_mask=None, image_weights=None, text_weights=None
):
  """Stand-in joint encoder (numpy): normalised weighted mean of the given tokens."""
  parts, weights = [], []
  if image_tokens is not None:
    parts.append(np.asarray(image_tokens, np.float64))
    weights.append(
        np.ones(image_tokens.shape[:2])
        if image_weights is None
        else np.asarray(image_weights, np.float64)
    )
  if text_tokens is not None:
    w = (
        np.ones(text_tokens.shape[:2])
        if text_weights is None
        else np.asarray(text_weights, np.float64)
    )
    parts.append(np.asarray(text_tokens, np.float64))
    weights.append(w * np.asarray(text_mask, np.float64))
  tokens, weights = np.concatenate(parts, 1), np.concatenate(weights, 1)
  return normalize(np.einsum("bt,btd->bd", weights, tokens) / weights.sum(-1, keepdims=True))


def pooled_joint_jax(
    image_tokens=None, text_tokens=None, text_mask=None, image_weights=None, text_weights=None
):
  """The same stand-in in JAX, for the code under test to call."""
  parts, weights = [], []
  if image_tokens is not None:
    parts.append(image_tokens)
    weights.append(jnp.ones(image_tokens.shape[:2]) if image_weights is None else image_weights)
  if text_tokens is not None:
    w = jnp.ones(text_tokens.shape[:2]) if text_weights is None else text_weights
    parts.append(text_tokens)
    weights.append(w * text_mask)
  tokens, weights = jnp.concatenate(parts, 1), jnp.concatenate(weights, 1).astype(jnp.float32)
  pooled = jnp.einsum("bt,btd->bd", weights, tokens) / weights.sum(-1, keepdims=True)
  return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
