"""Optimizer from ``config.optim``: AdamW with warmup + cosine, clipping, freezing, LR groups.

Parameters are addressed by their '/'-joined path (e.g. 'image_tower/encoder/block0/attn/query/
kernel'); ``freeze`` and ``lr_mults`` match regexes against it (``re.search``).
"""

import re

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def param_paths(params) -> dict:
  """{'/'-joined path: leaf} of a parameter tree."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _label_tree(params, fn):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: fn("/".join(k), v) for k, v in flat.items()})


def _path_str(key_path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in key_path)


def decay_mask(params):
  """Weight decay on weight matrices only: not on norms, biases, position embeddings or the
  temperature. Works on the partial trees multi_transform hands to each group."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, v: v.ndim > 1 and "pos_embed" not in _path_str(kp), params
  )


def schedule(optim_cfg, total_steps: int):
  """Linear warmup to ``lr`` then cosine decay to ``lr * end_lr_factor`` (or constant)."""
  warmup = int(optim_cfg.warmup_steps)
  if optim_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0,
        optim_cfg.lr,
        warmup_steps=max(warmup, 1),
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.end_lr_factor,
    )
  if optim_cfg.schedule == "constant":
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, optim_cfg.lr, max(warmup, 1)),
            optax.constant_schedule(optim_cfg.lr),
        ],
        [max(warmup, 1)],
    )
  raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {optim_cfg.schedule!r}")


def _group_of(path, freeze, lr_mults):
  if freeze and re.search(freeze, path):
    return "frozen"
  for i, (pattern, _) in enumerate(lr_mults):
    if re.search(pattern, path):
      return f"group{i}"
  return "default"


def frozen_mask(optim_cfg, params):
  """Pytree of bools over ``params``: True where ``optim.freeze`` matches (None: nothing frozen).

  The train step stops gradients at these leaves, so XLA drops the backward pass of a frozen
  tower instead of computing gradients that the optimizer then zeroes.
  """
  if not optim_cfg.freeze:
    return None
  return _label_tree(params, lambda path, _: _group_of(path, optim_cfg.freeze, ()) == "frozen")


def make_optimizer(optim_cfg, params, total_steps: int):
  """Returns (optax transform, learning-rate schedule) for ``params``.

  Frozen parameters (regex ``optim.freeze``) get zero updates and no optimizer state;
  ``optim.lr_mults`` = ((regex, multiplier), ...) scales the learning rate of matching groups.
  """
  lr = schedule(optim_cfg, total_steps)
  lr_mults = tuple(tuple(pair) for pair in optim_cfg.lr_mults)

  def adamw(mult):
    return optax.adamw(
        lambda step: lr(step) * mult,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=decay_mask,
    )

  labels = _label_tree(params, lambda path, _: _group_of(path, optim_cfg.freeze, lr_mults))
  used = set(jax.tree.leaves(labels))
  if optim_cfg.freeze and "frozen" not in used:
    raise ValueError(
        f"optim.freeze={optim_cfg.freeze!r} matches no parameter; "
        f"some parameter paths: {sorted(param_paths(params))[:8]}"
    )
  transforms = {"default": adamw(1.0), "frozen": optax.set_to_zero()}
  transforms.update({f"group{i}": adamw(float(m)) for i, (_, m) in enumerate(lr_mults)})
  frozen = jax.tree.map(lambda label: label == "frozen", labels)
  # Frozen gradients are zeroed before clipping so that they do not count in the global norm.
  tx = optax.chain(
      optax.masked(optax.set_to_zero(), frozen),
      optax.clip_by_global_norm(optim_cfg.clip_norm),
      optax.multi_transform(transforms, labels),
  )
  return tx, lr


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
