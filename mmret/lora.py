"""LoRA (low-rank adaptation, Hu et al. 2021) of kernels: pure functions over the parameter tree.

A kernel W is tuned as W' = W + (alpha / rank) * reshape(A @ B, W.shape), with A [fan_in, rank]
and B [rank, fan_out]; with W frozen only A and B train.

Where the factors live: in a top-level subtree ``params["lora"]`` that mirrors the paths of the
kernels it adapts. The kernel 'text_tower/encoder/block0/attn/query/kernel' gets the leaves
'lora/text_tower/encoder/block0/attn/query/kernel/a' (A) and '.../kernel/b' (B). The optimizer,
checkpoints, ``optim.freeze`` / ``optim.frozen_mask`` and ``optim.lr_mults`` therefore treat
them as ordinary parameters: a freeze regex anchored at the towers ('^(image|text)_tower/') leaves
them trainable, '^lora/' selects them (e.g. for a learning-rate multiplier). Being 2-D, they get
AdamW's weight decay like other matrices. The model never sees the subtree: :func:`merged`
removes it and adds each update to its kernel.

Which leaves can be adapted (*eligible kernels*): leaves named 'kernel' with at least 2 axes,
except depthwise convolutions (4-D [kh, kw, 1, channels] kernels: one input channel per group,
e.g. EfficientNet's 'depthwise' convs). Biases, norms, embeddings ('embedding'), position
embeddings and the temperature are never adapted. The ``targets`` regex is searched
(``re.search``) in the paths of the eligible kernels; every eligible kernel it matches is adapted.

How a kernel is viewed as a matrix [fan_in, fan_out]: its leading ``in_ndim`` axes are the input
and the others the output (row-major flattening of each group). The default ``in_ndim`` is
``ndim - 1``, which is right for Dense [in, out], convolutions [kh, kw, in, out] (fan_in =
kh * kw * in: a low-rank update of the unfolded filter bank) and DenseGeneral kernels whose output
is their last axis (e.g. an attention output projection [heads, head_dim, width]). A DenseGeneral
kernel with several output axes (e.g. [width, heads, head_dim]) needs ``in_ndim=1`` given to
:func:`init`; :func:`merge` takes the split from the shapes of A and B.

Initialisation follows the LoRA paper and PEFT: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's
Kaiming-uniform with a = sqrt(5)), B = 0, so the merged kernels equal the base ones at
initialisation.
"""

import math
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

LORA = "lora"  # top-level key of the factors in the parameter tree
FACTORS = ("a", "b")


def _flat(params) -> dict:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def ineligible_reason(path: str, leaf) -> Optional[str]:
  """Why the leaf at ``path`` cannot be adapted, or None when it is an eligible kernel."""
  if path.rsplit("/", 1)[-1] != "kernel":
    return "not a kernel"
  if leaf.ndim < 2:
    return f"a kernel of {leaf.ndim} axes"
  if leaf.ndim == 4 and leaf.shape[2] == 1:
    return "a depthwise convolution kernel (one input channel per group)"
  return None


def _compile(targets: str, what: str = "targets"):
  if not isinstance(targets, str) or not targets:
    raise ValueError(f"LoRA {what} must be a non-empty regex over parameter paths, got {targets!r}")
  try:
    return re.compile(targets)
  except re.error as e:
    raise ValueError(f"LoRA {what} {targets!r} is not a valid regex: {e}") from None


def select(params, targets: str) -> list:
  """Sorted paths of the eligible kernels of ``params`` that ``targets`` matches (re.search).

  Raises ValueError naming the regex when it is invalid or matches no eligible kernel.
  """
  pattern = _compile(targets)
  flat = {p: v for p, v in _flat(params).items() if not p.startswith(LORA + "/")}
  eligible = {p for p, v in flat.items() if ineligible_reason(p, v) is None}
  chosen = sorted(p for p in eligible if pattern.search(p))
  if not chosen:
    ineligible = sorted(
        f"{p} ({ineligible_reason(p, v)})"
        for p, v in flat.items()
        if p not in eligible and pattern.search(p)
    )
    detail = (
        f"it matches only leaves that cannot be adapted: {ineligible[:6]}"
        if ineligible
        else f"some eligible kernels: {sorted(eligible)[:8]}"
    )
    raise ValueError(f"LoRA targets {targets!r} match no eligible kernel; {detail}")
  return chosen


def init(
    params,
    key,
    *,
    rank: int,
    targets: str,
    in_ndim: Optional[Callable[[str, tuple], int]] = None,
) -> dict:
  """LoRA factors {'a': A [fan_in, rank], 'b': B [rank, fan_out] = 0} for each targeted kernel.

  Returns the subtree to store as ``params["lora"]`` (same nesting as the kernels, the factors
  one level below each kernel's name). ``in_ndim(path, shape)``: how many leading axes of a
  kernel are its input (default ``len(shape) - 1``). The factors have their kernel's dtype.
  """
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
  if LORA in params:
    raise ValueError(f"the parameters already hold a {LORA!r} subtree; LoRA factors exist")
  flat = _flat(params)
  paths = select(params, targets)
  keys = jax.random.split(key, len(paths))
  factors = {}
  for path, k in zip(paths, keys):
    kernel = flat[path]
    split = (kernel.ndim - 1) if in_ndim is None else int(in_ndim(path, tuple(kernel.shape)))
    if not 1 <= split < kernel.ndim:
      raise ValueError(
          f"LoRA in_ndim for {path} (shape {tuple(kernel.shape)}) must be in [1, "
          f"{kernel.ndim - 1}], got {split}"
      )
    fan_in = math.prod(kernel.shape[:split])
    fan_out = math.prod(kernel.shape[split:])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(k, (fan_in, rank), kernel.dtype, -bound, bound)
    factors[path + "/a"] = a
    factors[path + "/b"] = jnp.zeros((rank, fan_out), kernel.dtype)
  return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in factors.items()})


def merge(params, lora_tree, *, alpha: float, rank: int):
  """``params`` with W' = W + (alpha / rank) * reshape(A @ B, W.shape) at each adapted kernel.

  ``params``: the base tree (without the 'lora' subtree); ``lora_tree``: what :func:`init` made
  (or its trained values). Leaves that are not adapted are returned as they are.
  """
  flat = _flat(params)
  grouped = {}
  for path, value in _flat(lora_tree).items():
    kernel_path, _, factor = path.rpartition("/")
    if factor not in FACTORS:
      raise ValueError(f"LoRA leaf {LORA}/{path} is not a factor {FACTORS}")
    grouped.setdefault(kernel_path, {})[factor] = value
  scale = float(alpha) / rank
  out = dict(flat)
  for path, factors in sorted(grouped.items()):
    if set(factors) != set(FACTORS):
      raise ValueError(f"LoRA factors of {path} are {sorted(factors)}, need {list(FACTORS)}")
    if path not in flat:
      raise ValueError(f"LoRA factors {LORA}/{path}/{{a,b}} adapt no parameter: {path} is absent")
    kernel, a, b = flat[path], factors["a"], factors["b"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
      raise ValueError(
          f"LoRA factors of {path} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
          f"expected [fan_in, {rank}] and [{rank}, fan_out] (rank={rank})"
      )
    if a.shape[0] * b.shape[1] != math.prod(kernel.shape):
      raise ValueError(
          f"LoRA factors of {path}: A {tuple(a.shape)} @ B {tuple(b.shape)} does not have "
          f"the size of the kernel {tuple(kernel.shape)}"
      )
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
    out[path] = kernel + (scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in out.items()})


def merged(params, *, alpha: float, rank: int):
  """The tree the model computes with: ``params["lora"]`` merged into its kernels and removed.

  Parameters without a 'lora' subtree (e.g. already merged) are returned unchanged.
  """
  if LORA not in params:
    return params
  if not rank:
    raise ValueError(
        f"the parameters hold LoRA factors ('{LORA}/...') but model.lora.rank is {rank!r}"
    )
  base = {k: v for k, v in params.items() if k != LORA}
  return merge(base, params[LORA], alpha=alpha, rank=rank)


def check_not_frozen(freeze: str, lora_tree):
  """Raises ValueError when the regex ``freeze`` (``optim.freeze``) matches a LoRA factor."""
  if not freeze:
    return
  pattern = _compile(freeze, "optim.freeze")
  hits = sorted(p for p in (f"{LORA}/{q}" for q in _flat(lora_tree)) if pattern.search(p))
  if hits:
    raise ValueError(
        f"optim.freeze={freeze!r} also freezes LoRA factors (e.g. {hits[:2]}): anchor it at the "
        "towers, e.g. '^(image|text)_tower/'"
    )


def config_values(lora_cfg) -> Optional[tuple]:
  """(rank, alpha, targets) of ``config.model.lora``, or None when LoRA is off (rank 0 or absent).

  Raises ValueError naming the field for an impossible value.
  """
  if lora_cfg is None:
    return None
  unknown = sorted(set(lora_cfg.keys()) - {"rank", "alpha", "targets"})
  if unknown:
    raise ValueError(f"model.lora: unknown fields {unknown}; known: ['alpha', 'rank', 'targets']")
  rank = lora_cfg.get("rank", 0)
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise ValueError(f"model.lora.rank must be an integer >= 0 (0: off), got {rank!r}")
  if rank == 0:
    return None
  alpha = lora_cfg.get("alpha", 16.0)
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
    raise ValueError(f"model.lora.alpha must be a finite number, got {alpha!r}")
  targets = lora_cfg.get("targets", "")
  if not targets:
    raise ValueError(
        f"model.lora.rank={rank} needs model.lora.targets, a regex over kernel paths "
        "(e.g. '^text_tower/.*(query|value)/kernel$')"
    )
  _compile(targets, "model.lora.targets")
  return rank, float(alpha), targets
