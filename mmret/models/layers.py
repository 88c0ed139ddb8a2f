"""Transformer building blocks shared by the image, text and joint encoders."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret.ops import NEG_INF, masked_mean

Dtype = Any


def check_pixels_normalized(images):
  """Image towers take normalised float pixels: uint8 ones reaching a tower skipped the
  normalisation the step and embedding pass apply (``mmret.ops.normalize_pixels``)."""
  if images.dtype == jnp.uint8:
    raise TypeError(
        "an image tower got uint8 pixels: normalise them first with mmret.ops.normalize_pixels "
        "(train.Setup's forward and predict do)"
    )


def quick_gelu(x):
  """OpenAI CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  """Exact GELU, ``x * Phi(x)`` with the normal CDF from ``erf`` (as PyTorch's ``F.gelu``).

  ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, whose XLA expansion evaluates two
  polynomials, an exponential and divisions per element, forward and again in the backward pass:
  on the CPU about a fifth of the tiny benchmark's train step. ``erf`` is one clamped rational
  polynomial; the two agree to float32 rounding except deep in the negative tail, where both
  are ~0 (absolute difference < 2e-6, tested against float64).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))).astype(x.dtype))


ACTIVATIONS = {
    "gelu": gelu,  # exact (erf) GELU: BERT, ViT, DINOv2
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
    "relu6": jax.nn.relu6,
}


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = activation_fn(self.activation)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class Attention(nn.Module):
  """Multi-head self-attention with an additive bias (hard masks and soft per-key weights).

  Parameters: query/key/value/out Dense layers of shape [width, width], the layout the
  pretrained-checkpoint converters write into.
  """

  heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias=None, *, train: bool):
    b, t, width = x.shape
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by {self.heads} heads")
    head_dim = width // self.heads
    split = lambda y: y.reshape(b, t, self.heads, head_dim)  # noqa: E731
    q = split(nn.Dense(width, dtype=self.dtype, name="query")(x))
    k = split(nn.Dense(width, dtype=self.dtype, name="key")(x))
    v = split(nn.Dense(width, dtype=self.dtype, name="value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, width)
    return nn.Dense(width, dtype=self.dtype, name="out")(y)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)); x + mlp(ln(x)).

  ``layer_scale`` (DINOv2) multiplies each branch by a learned per-channel vector (``ls1``,
  ``ls2``) before the residual sum.
  """

  heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu"
  ln_eps: float = 1e-6
  layer_scale: bool = False

  @nn.compact
  def __call__(self, x, attention_bias=None, *, train: bool):
    def residual(branch, name):
      if self.layer_scale:
        branch = branch * self.param(name, nn.initializers.constant(1e-5), (x.shape[-1],))
      return x + nn.Dropout(self.dropout, deterministic=not train)(branch)

    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln1")(x)
    y = Attention(self.heads, self.dropout, self.dtype, name="attn")(y, attention_bias, train=train)
    x = residual(y, "ls1")
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.activation, name="mlp")(
        y, train=train
    )
    return residual(y, "ls2")


class Encoder(nn.Module):
  """A stack of ``depth`` pre-LN blocks followed by a final LayerNorm."""

  depth: int
  heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu"
  ln_eps: float = 1e-6
  layer_scale: bool = False

  @nn.compact
  def __call__(self, x, attention_bias=None, *, train: bool):
    for i in range(self.depth):
      x = EncoderBlock(
          self.heads,
          self.mlp_dim,
          self.dropout,
          self.dtype,
          self.activation,
          self.ln_eps,
          self.layer_scale,
          name=f"block{i}",
      )(x, attention_bias, train=train)
    return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_final")(x)


def key_bias(key_weights, dtype=jnp.float32):
  """Attention bias [B,1,1,K] from per-key weights in [0,1] (bool masks included).

  A weight w scales the key's attention probability by w before renormalisation
  (bias = log w), so a hard mask removes a key and a soft (annealed) mask down-weights it.
  """
  w = jnp.asarray(key_weights, jnp.float32)
  bias = jnp.where(w > 0, jnp.log(jnp.maximum(w, 1e-30)), NEG_INF)
  return bias[:, None, None, :].astype(dtype)


def causal_bias(length: int, dtype=jnp.float32):
  """Attention bias [1,1,L,L] letting position i see positions <= i (CLIP's text tower)."""
  allowed = jnp.tril(jnp.ones((length, length), bool))
  return jnp.where(allowed, 0.0, NEG_INF)[None, None].astype(dtype)


TEXT_POOLS = ("eos", "cls", "mean")


def check_text(text_ids, max_len: int, pool: str):
  """Refuses a text pooling it does not know and texts longer than the position table."""
  if pool not in TEXT_POOLS:
    raise ValueError(f"text pool must be one of {TEXT_POOLS}, got {pool!r}")
  if text_ids.shape[1] > max_len:
    raise ValueError(f"text length {text_ids.shape[1]} exceeds the model's max_len {max_len}")


def pool_text(tokens, text_mask, pool: str):
  """One vector per text from its tokens [B,L,w]: 'eos' (the last real token, CLIP), 'cls' (the
  first token, BERT) or 'mean' (over real tokens, sentence-transformers)."""
  if pool == "cls":
    return tokens[:, 0]
  if pool == "mean":
    return masked_mean(tokens, text_mask)
  if pool == "eos":
    last = jnp.maximum(text_mask.sum(axis=1) - 1, 0)
    return jnp.take_along_axis(tokens, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"text pool must be one of {TEXT_POOLS}, got {pool!r}")
