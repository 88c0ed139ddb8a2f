"""Flat-memory contrastive losses: reductions over blocks of logits, chunked or around a device ring.

The dense losses build each device's logits against every column of the global batch ([B, N] or
[B, 3N]), so their memory grows with the square of the global batch. Here the logits exist one
[rows, block_size] block at a time: each row keeps an online log-sum-exp (running max and rescaled
sum), a running max with its column, and a hinge sum; the columns of a block get the same
reductions over the block's rows, so one sweep gives both directions of a two-way loss (CLIP's
image->text and text->image). A custom VJP recomputes every block in the backward pass instead of
storing it (Inf-CL's tile-wise scheme).

``impl`` picks where the columns come from:

- ``"dense"``: the losses' original code (``mmret.losses.contrastive``, ``gcl``, ``vsepp``).
- ``"chunked"``: the column embeddings are gathered from all devices (O(N d) memory, gathered
  again in the backward rather than kept) and swept block by block; column reductions are
  combined across devices (O(N) traffic) and column gradients reduce-scattered to their owners.
- ``"ring"``: nothing is gathered. Each device sweeps its own columns, then passes them with
  ``lax.ppermute`` to the next device; after D-1 passes every device has seen every column. The
  column reductions and, in the backward, the column gradients travel with their block, collecting
  every device's rows, until they are back on the device that owns the columns. Works inside
  ``pmap`` and ``shard_map``; on one device (``axis_name=None``) it is the chunked sweep.

Every loss here equals its dense counterpart in value, gradient (embeddings and ``logit_scale``)
and metrics, up to float32 rounding. Column info (sample index, modality or view, validity) goes
with each block, so masks are functions of a block of rows and a block of columns and no [N, N]
array is ever built.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mmret.losses.common import global_offset, local_labels
from mmret.ops import NEG_INF

IMPLS = ("dense", "chunked", "ring")
DEFAULT_BLOCK_SIZE = 512
KINDS = ("lse", "max", "hinge")
_NO_INDEX = jnp.iinfo(jnp.int32).max


def check_impl(impl, block_size):
  """Raises ValueError naming ``loss.impl`` or ``loss.block_size`` when either is not usable."""
  if impl not in IMPLS:
    raise ValueError(f"loss.impl must be one of {IMPLS}, got {impl!r}")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"loss.block_size must be a positive integer, got {block_size!r}")


def axis_size(axis_name) -> int:
  """Number of devices along ``axis_name`` (1 when None)."""
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


# --------------------------------------------------------------------------------------------------
# Columns: this device's share, gathered, split into blocks, passed around the ring
# --------------------------------------------------------------------------------------------------


class Columns(NamedTuple):
  """This device's columns: embeddings ``k`` [P*B, d] (P pieces of B local samples, piece-major)
  and per-column ``info`` [P*B] (``sample``: global sample index, ``piece``, ``index``: the column's
  index in the dense layout, where column p * N + s is piece p of global sample s, and the
  caller's fields)."""

  k: jax.Array
  info: dict
  n_pieces: int


def columns(pieces, axis_name, **info) -> Columns:
  """The columns made of P local [B,d] ``pieces`` (modalities or views) of this device's samples.

  ``info`` maps a name to P local [B] arrays (one per piece) that masks read.
  """
  local_batch, n_pieces = pieces[0].shape[0], len(pieces)
  n_global = local_batch * axis_size(axis_name)
  sample = jnp.tile(local_labels(local_batch, axis_name), n_pieces).astype(jnp.int32)
  piece = jnp.repeat(jnp.arange(n_pieces, dtype=jnp.int32), local_batch)
  extra = {name: jnp.concatenate(values) for name, values in info.items()}
  info = dict(extra, sample=sample, piece=piece, index=piece * n_global + sample)
  return Columns(jnp.concatenate(pieces, axis=0), info, n_pieces)


def _device_major(x, n_pieces, n_devices):
  """[P*D*B, ...] (dense layout) <-> [D*P*B, ...] (each device's columns together)."""
  per = x.shape[0] // (n_pieces * n_devices)
  x = x.reshape((n_pieces, n_devices, per) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[3:])


def _piece_major(x, n_pieces, n_devices):
  per = x.shape[0] // (n_pieces * n_devices)
  x = x.reshape((n_devices, n_pieces, per) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[3:])


def _gather_columns(tree, n_pieces, axis_name):
  """Every device's columns of each leaf, in the dense layout (identity on one device)."""
  if axis_name is None:
    return tree
  n = axis_size(axis_name)
  return jax.tree.map(
      lambda x: _piece_major(jax.lax.all_gather(x, axis_name, tiled=True), n_pieces, n), tree
  )


def _own_columns(tree, n_pieces, axis_name):
  """This device's columns of dense-layout leaves [P*N, ...]."""
  if axis_name is None:
    return tree
  n = axis_size(axis_name)

  def own(x):
    x = _device_major(x, n_pieces, n).reshape((n, -1) + x.shape[1:])
    return jax.lax.dynamic_index_in_dim(x, jax.lax.axis_index(axis_name), keepdims=False)

  return jax.tree.map(own, tree)


def _sum_to_owners(tree, n_pieces, axis_name):
  """Dense-layout leaves [P*N, ...] summed over devices, each device keeping its own columns."""
  if axis_name is None:
    return tree
  n = axis_size(axis_name)
  return jax.tree.map(
      lambda x: jax.lax.psum_scatter(
          _device_major(x, n_pieces, n), axis_name, scatter_dimension=0, tiled=True
      ),
      tree,
  )


def _blocks(tree, block_size):
  """Leaves [C, ...] -> [nb, bs, ...] blocks, padded at the end; adds ``real`` (not padding)."""
  n = jax.tree.leaves(tree)[0].shape[0]
  size = min(block_size, n)
  count = -(-n // size)
  pad = count * size - n
  tree = dict(tree, real=jnp.ones((n,), bool))

  def split(x):
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((count, size) + x.shape[1:])

  return jax.tree.map(split, tree)


def _unblock(tree, n):
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:n], tree)


def _pass_on(tree, axis_name):
  """Sends every device's ``tree`` to the next device on the ring (the last to the first)."""
  n = axis_size(axis_name)
  perm = [(i, (i + 1) % n) for i in range(n)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


class _Sweep(NamedTuple):
  """How the column blocks are visited: around the ring of ``axis_name``'s devices (``ring``), or
  gathered from them (from this device alone when ``axis_name`` is None)."""

  axis_name: Optional[str]
  ring: bool
  block_size: int
  n_pieces: int


def _sweep(sweep, step, carry, data, merge, across_devices):
  """Runs ``step(carry, block) -> (carry, column_out)`` on every column block.

  ``data``: this device's per-column arrays [C, ...] (embeddings, info, column-side inputs).
  ``column_out``: per-column results [bs, ...] from this device's rows; ``merge(a, b)`` combines
  two devices' (associative). Gathered: ``across_devices(out [P*N, ...])`` turns this device's
  results for all columns into every device's, for this device's columns. Ring: the results
  travel with their block and are merged on the way. Returns (carry, out [C, ...]).
  """
  n_local = jax.tree.leaves(data)[0].shape[0]

  def local(carry, blocks):
    return jax.lax.scan(step, carry, blocks)

  if not sweep.ring:
    data = _gather_columns(data, sweep.n_pieces, sweep.axis_name)
    n_all = jax.tree.leaves(data)[0].shape[0]
    carry, out = local(carry, _blocks(data, sweep.block_size))
    return carry, across_devices(_unblock(out, n_all))

  def ring_step(state, _):
    carry, blocks, out = state
    passed = _pass_on(blocks, sweep.axis_name)  # needs no result of this step: may overlap it
    carry, new = local(carry, blocks)
    return (carry, passed, _pass_on(merge(out, new), sweep.axis_name)), None

  blocks = _blocks(data, sweep.block_size)
  passed = _pass_on(blocks, sweep.axis_name)
  carry, out = local(carry, blocks)
  state = (carry, passed, _pass_on(out, sweep.axis_name))
  n = axis_size(sweep.axis_name)
  (carry, _, out), _ = jax.lax.scan(ring_step, state, None, length=n - 1)
  return carry, _unblock(out, n_local)


# --------------------------------------------------------------------------------------------------
# Row and column reductions with a recomputing VJP
# --------------------------------------------------------------------------------------------------


class _Spec(NamedTuple):
  masks: Optional[Callable]  # (row_info, column_info) -> n_masks bool arrays broadcasting to [R,c]
  n_masks: int
  kinds: tuple  # row reductions, each over every mask
  column_kinds: tuple  # column reductions, over mask 0
  sweep: _Sweep
  argmax: bool  # whether rows track the column of their largest masked logit


def _block_terms(spec, q, k_block, scale, row_info, info):
  """Raw scores q.k [R,c], logits scale*raw, and per mask: the mask and masked logits [R,c]."""
  raw = jnp.dot(q, k_block.T, preferred_element_type=jnp.float32)
  logits = scale * raw
  real = info["real"][None, :]
  if spec.masks is None:
    masks = [jnp.broadcast_to(real, raw.shape)] * spec.n_masks
  else:
    masks = [jnp.broadcast_to(m & real, raw.shape) for m in spec.masks(row_info, info)]
    if len(masks) != spec.n_masks:
      raise ValueError(f"reduce_blocks: masks returned {len(masks)} masks, n_masks={spec.n_masks}")
  # Masked-out entries hold NEG_INF as in the dense losses (a row with nothing left stays finite).
  return raw, logits, masks, [jnp.where(m, logits, NEG_INF) for m in masks]


def _merge_columns(a, b):
  """Combines two devices' column reductions (of disjoint rows)."""
  out = {}
  if "lse_max" in a:
    top = jnp.maximum(a["lse_max"], b["lse_max"])
    out["lse_max"] = top
    out["lse_sum"] = a["lse_sum"] * jnp.exp(a["lse_max"] - top) + b["lse_sum"] * jnp.exp(
        b["lse_max"] - top
    )
  if "max" in a:
    out["max"] = jnp.maximum(a["max"], b["max"])
    tie = jnp.minimum(a["argmax"], b["argmax"])
    out["argmax"] = jnp.where(
        a["max"] > b["max"], a["argmax"], jnp.where(b["max"] > a["max"], b["argmax"], tie)
    )
  if "hinge" in a:
    out["hinge"] = a["hinge"] + b["hinge"]
  return out


def _columns_across_devices(out, n_pieces, axis_name):
  """This device's column reductions over all columns -> every device's, for its own columns."""
  if axis_name is not None:
    out = dict(out)
    if "lse_max" in out:
      top = jax.lax.pmax(out["lse_max"], axis_name)
      out["lse_sum"] = jax.lax.psum(out["lse_sum"] * jnp.exp(out["lse_max"] - top), axis_name)
      out["lse_max"] = top
    if "max" in out:
      top = jax.lax.pmax(out["max"], axis_name)
      out["argmax"] = jax.lax.pmin(
          jnp.where(out["max"] == top, out["argmax"], _NO_INDEX), axis_name
      )
      out["max"] = top
    if "hinge" in out:
      out["hinge"] = jax.lax.psum(out["hinge"], axis_name)
  return _own_columns(out, n_pieces, axis_name)


def _forward(spec, q, k, scale, offset, column_offset, row_info, col_info):
  shape = (spec.n_masks, q.shape[0])
  carry = {"max": jnp.full(shape, -jnp.inf, jnp.float32), "any": jnp.zeros(shape, bool)}
  if spec.argmax:
    carry["argmax"] = jnp.full(shape, _NO_INDEX, jnp.int32)
  if "lse" in spec.kinds:
    carry["sum"] = jnp.zeros(shape, jnp.float32)
  if "hinge" in spec.kinds:
    carry["hinge"] = jnp.zeros(shape, jnp.float32)

  def step(carry, block):
    info = dict(block["info"], real=block["real"])
    _, logits, masks, values = _block_terms(spec, q, block["k"], scale, row_info, info)
    new = {name: [] for name in carry}
    for m in range(spec.n_masks):
      rows = jnp.where(info["real"][None, :], values[m], -jnp.inf)  # padding never counts
      block_max = jnp.max(rows, axis=-1)
      old = carry["max"][m]
      new_max = jnp.maximum(old, block_max)
      new["max"].append(new_max)
      new["any"].append(carry["any"][m] | jnp.any(masks[m], axis=-1))
      if spec.argmax:
        block_arg = info["index"][jnp.argmax(rows, axis=-1)]
        # Ties go to the smaller dense-layout index, as jnp.argmax over the dense row does.
        better = (block_max > old) | ((block_max == old) & (block_arg < carry["argmax"][m]))
        new["argmax"].append(jnp.where(better, block_arg, carry["argmax"][m]))
      if "lse" in spec.kinds:
        total = jnp.sum(jnp.exp(rows - new_max[:, None]), axis=-1)
        new["sum"].append(carry["sum"][m] * jnp.exp(old - new_max) + total)
      if "hinge" in spec.kinds:
        hinge = jnp.where(masks[m], jax.nn.relu(logits + offset[:, None]), 0.0)
        new["hinge"].append(carry["hinge"][m] + jnp.sum(hinge, axis=-1))
    new = {name: jnp.stack(values_m) for name, values_m in new.items()}
    # The block's columns over this device's rows (mask 0).
    cols = {}
    if "lse" in spec.column_kinds:
      cols["lse_max"] = jnp.max(values[0], axis=0)
      cols["lse_sum"] = jnp.sum(jnp.exp(values[0] - cols["lse_max"]), axis=0)
    if "max" in spec.column_kinds:
      cols["max"] = jnp.max(values[0], axis=0)
      cols["argmax"] = row_info["index"][jnp.argmax(values[0], axis=0)]
    if "hinge" in spec.column_kinds:
      active = jnp.where(masks[0], jax.nn.relu(logits + block["offset"][None, :]), 0.0)
      cols["hinge"] = jnp.sum(active, axis=0)
    return new, cols

  data = {"k": k, "info": col_info}
  if column_offset is not None:
    data["offset"] = column_offset
  across = lambda out: _columns_across_devices(out, spec.sweep.n_pieces, spec.sweep.axis_name)
  carry, cols = _sweep(spec.sweep, step, carry, data, _merge_columns, across)

  out = {k: carry[k] for k in ("argmax", "any") if k in carry}
  if "lse" in spec.kinds:
    out["lse"] = carry["max"] + jnp.log(carry["sum"])
  if "max" in spec.kinds:
    out["max"] = jnp.maximum(carry["max"], NEG_INF)
  if "hinge" in spec.kinds:
    out["hinge"] = carry["hinge"]
  columns_out = {}
  if "lse" in spec.column_kinds:
    columns_out["lse"] = cols["lse_max"] + jnp.log(cols["lse_sum"])
  if "max" in spec.column_kinds:
    columns_out["max"], columns_out["argmax"] = cols["max"], cols["argmax"]
  if "hinge" in spec.column_kinds:
    columns_out["hinge"] = cols["hinge"]
  return {"rows": out, "columns": columns_out}


def _backward(spec, residuals, g):
  q, k, scale, offset, column_offset, row_info, col_info, out = residuals
  rows_out, g_rows = out["rows"], g["rows"]
  carry = {"dq": jnp.zeros(q.shape, jnp.float32), "dscale": jnp.zeros((), jnp.float32)}
  if "hinge" in spec.kinds:
    carry["doffset"] = jnp.zeros(q.shape[:1], jnp.float32)

  def step(carry, block):
    info = dict(block["info"], real=block["real"])
    raw, logits, masks, values = _block_terms(spec, q, block["k"], scale, row_info, info)
    carry = dict(carry)
    dlogits = jnp.zeros(raw.shape, jnp.float32)
    for m in range(spec.n_masks):
      if "lse" in spec.kinds:
        p = jnp.exp(values[m] - rows_out["lse"][m][:, None])
        dlogits += jnp.where(masks[m], g_rows["lse"][m][:, None] * p, 0.0)
      if "max" in spec.kinds:
        hit = masks[m] & (info["index"][None, :] == rows_out["argmax"][m][:, None])
        dlogits += jnp.where(hit, g_rows["max"][m][:, None], 0.0)
      if "hinge" in spec.kinds:
        active = masks[m] & (logits + offset[:, None] > 0)
        active = jnp.where(active, g_rows["hinge"][m][:, None], 0.0)
        dlogits += active
        carry["doffset"] = carry["doffset"] + jnp.sum(active, axis=-1)
    cols = {}
    col_out, g_col = block.get("out", {}), block.get("g", {})
    if "lse" in spec.column_kinds:
      p = jnp.exp(values[0] - col_out["lse"][None, :])
      dlogits += jnp.where(masks[0], g_col["lse"][None, :] * p, 0.0)
    if "max" in spec.column_kinds:
      hit = masks[0] & (row_info["index"][:, None] == col_out["argmax"][None, :])
      dlogits += jnp.where(hit, g_col["max"][None, :], 0.0)
    if "hinge" in spec.column_kinds:
      active = jnp.where(masks[0] & (logits + block["offset"][None, :] > 0), g_col["hinge"], 0.0)
      dlogits += active
      cols["doffset"] = jnp.sum(active, axis=0)
    carry["dscale"] = carry["dscale"] + jnp.sum(dlogits * raw)
    dscores = scale * dlogits
    carry["dq"] = carry["dq"] + jnp.dot(dscores, block["k"], preferred_element_type=jnp.float32)
    cols["dk"] = jnp.dot(dscores.T, q, preferred_element_type=jnp.float32)
    return carry, cols

  data = {"k": k, "info": col_info}
  if spec.column_kinds:
    data["out"] = out["columns"]
    data["g"] = {kind: g["columns"][kind] for kind in spec.column_kinds}
  if column_offset is not None:
    data["offset"] = column_offset
  add = lambda a, b: jax.tree.map(jnp.add, a, b)
  to_owners = lambda d: _sum_to_owners(d, spec.sweep.n_pieces, spec.sweep.axis_name)
  carry, cols = _sweep(spec.sweep, step, carry, data, add, to_owners)

  doffset = None
  if offset is not None:
    doffset = carry.get("doffset", jnp.zeros(offset.shape)).astype(offset.dtype)
  dcolumn_offset = None
  if column_offset is not None:
    dcolumn_offset = cols.get("doffset", jnp.zeros(column_offset.shape))
    dcolumn_offset = dcolumn_offset.astype(column_offset.dtype)
  return (
      carry["dq"].astype(q.dtype),
      cols["dk"].astype(k.dtype),
      carry["dscale"].astype(jnp.result_type(scale)),
      doffset,
      dcolumn_offset,
      None,
      None,
  )


def reduce_blocks(
    q,
    cols: Columns,
    scale=1.0,
    *,
    impl,
    block_size,
    axis_name=None,
    kinds=("lse",),
    column_kinds=(),
    masks=None,
    n_masks=1,
    row_info=None,
    offset=None,
    column_offset=None,
    argmax=False,
):
  """Reductions of the logits l_ij = scale * q_i.k_j along rows i (this device's ``q`` [R,d])
  and columns j (``cols``, every device's), holding one [R, block_size] block of logits at a time.

  Args:
    q: this device's rows. cols: this device's columns (:func:`columns`).
    scale: scalar multiplying the scores (differentiable: the learnable temperature).
    kinds: per row and mask, over the masked columns: ``"lse"`` (log-sum-exp), ``"max"`` (NEG_INF
      when none; its gradient goes to the arg max), ``"hinge"`` (sum of relu(l_ij + offset_i)).
    column_kinds: the same per column j of this device over mask 0 and the rows of all devices
      (the rows must be every device's share of one set, e.g. CLIP's images); ``"hinge"`` sums
      relu(l_ij + column_offset_j).
    masks: ``masks(row_info, column_block_info) -> n_masks`` bool arrays broadcasting to [R, c]
      (None: every column, ``n_masks`` times).
    row_info: dict of per-row arrays [R] the masks read; ``index`` (global row index, for the
      column arg max) defaults to this device's offset + arange(R).
    offset: [R], for ``"hinge"``. column_offset: this device's [C], for column ``"hinge"``.
    argmax: also return each row's arg max (always with ``"max"``).
  Returns {"rows": {kind: [n_masks, R], "argmax": dense-layout column index of the largest masked
  logit (first on ties), "any": whether any column is masked in}, "columns": {kind: [C],
  "argmax": row index, for "max"}}; the reductions are differentiable w.r.t. q, the columns'
  embeddings, scale and the offsets.
  """
  unknown = (set(kinds) | set(column_kinds)) - set(KINDS)
  if unknown:
    raise ValueError(f"reduce_blocks: unknown kinds {sorted(unknown)}; known: {KINDS}")
  if "hinge" in kinds and offset is None:
    raise ValueError("reduce_blocks: kind 'hinge' needs offset")
  if "hinge" in column_kinds and column_offset is None:
    raise ValueError("reduce_blocks: column kind 'hinge' needs column_offset")
  ring = impl == "ring" and axis_name is not None
  sweep = _Sweep(axis_name, ring, block_size, cols.n_pieces)
  spec = _Spec(masks, n_masks, tuple(kinds), tuple(column_kinds), sweep, argmax or "max" in kinds)
  scale = jnp.asarray(scale, jnp.float32)
  row_info = dict(row_info or {})
  if "index" not in row_info:
    row_info["index"] = global_offset(q.shape[0], axis_name) + jnp.arange(q.shape[0])

  @jax.custom_vjp
  def reduce(q, k, scale, offset, column_offset, row_info, col_info):
    return _forward(spec, q, k, scale, offset, column_offset, row_info, col_info)

  def reduce_fwd(*args):
    out = _forward(spec, *args)
    return out, args + (out,)

  reduce.defvjp(reduce_fwd, lambda residuals, g: _backward(spec, residuals, g))
  return reduce(q, cols.k, scale, offset, column_offset, row_info, cols.info)


def _dot(a, b):
  return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=-1)


# --------------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------------


def clip_loss(za, zb, scale, *, impl, block_size, axis_name=None):
  """Symmetric InfoNCE of ``za`` vs ``zb`` [B,d] (see ``contrastive.clip_loss``): (loss, metrics).

  One sweep over the blocks of scale * za.zb^T: its rows give a->b, its columns b->a.
  """
  labels = local_labels(za.shape[0], axis_name)
  positive = scale * _dot(za, zb)
  out = reduce_blocks(
      za,
      columns([zb], axis_name),
      scale,
      impl=impl,
      block_size=block_size,
      axis_name=axis_name,
      column_kinds=("lse",),
      argmax=True,
  )
  loss_ab = jnp.mean(out["rows"]["lse"][0] - positive)
  loss_ba = jnp.mean(out["columns"]["lse"] - positive)
  accuracy = jnp.mean(out["rows"]["argmax"][0] == labels)
  return 0.5 * (loss_ab + loss_ba), {
      "loss_i2t": loss_ab,
      "loss_t2i": loss_ba,
      "acc_i2t": accuracy,
      "scale": scale,
  }


def _partners(n_modalities):
  """partners[a] = the other modalities of anchor modality a, ascending."""
  return [[b for b in range(n_modalities) if b != a] for a in range(n_modalities)]


def gcl_loss(local, scale, *, drop_other_positive, impl, block_size, axis_name=None):
  """GCL's 3N-way softmax (see ``gcl.gcl_loss``) over the modalities ``local`` [M][B,d].

  The rows are this device's anchors of every modality, each softmax'd once over all M*N columns;
  with ``drop_other_positive`` each anchor has one masked softmax per positive modality.
  """
  n_mod, local_batch = len(local), local[0].shape[0]
  n_global = local_batch * axis_size(axis_name)
  own = local_labels(local_batch, axis_name)
  partners = _partners(n_mod)
  modality = jnp.repeat(jnp.arange(n_mod), local_batch)
  row_info = {
      "modality": modality,
      "sample": jnp.tile(own, n_mod),
      # partner[m] of a row: the positive of its m-th pair (a, b) with the anchor's modality a.
      "partner": jnp.asarray(partners, jnp.int32)[modality].T,
  }

  def masks(row, col):
    same = col["sample"][None, :] == row["sample"][:, None]
    if not drop_other_positive:  # everything but the anchor itself
      return (~(same & (col["piece"][None, :] == row["modality"][:, None])),)
    # Of the anchor's own sample only the pair's positive is left.
    return tuple(
        ~same | (col["piece"][None, :] == row["partner"][m][:, None]) for m in range(n_mod - 1)
    )

  out = reduce_blocks(
      jnp.concatenate(local, axis=0),
      columns(local, axis_name),
      scale,
      impl=impl,
      block_size=block_size,
      axis_name=axis_name,
      masks=masks,
      n_masks=n_mod - 1 if drop_other_positive else 1,
      row_info=row_info,
      argmax=True,
  )["rows"]
  losses, hits = [], []
  for a in range(n_mod):
    rows_a = slice(a * local_batch, (a + 1) * local_batch)
    for m, b in enumerate(partners[a]):
      mask_index = m if drop_other_positive else 0
      positive = scale * _dot(local[a], local[b])
      losses.append(jnp.mean(out["lse"][mask_index, rows_a] - positive))
      best_sample = out["argmax"][mask_index, rows_a] % n_global
      hits.append(jnp.mean(best_sample == own))
  loss = jnp.mean(jnp.stack(losses))
  return loss, {"acc_same_sample": jnp.mean(jnp.stack(hits)), "scale": scale}


def pairwise_losses(local, scale, *, impl, block_size, axis_name=None):
  """The InfoNCE terms a->b over modality b (see ``gcl.pairwise_loss``): {(a, b): term}.

  One sweep per unordered pair a < b: rows give a->b, columns b->a.
  """
  terms = {}
  for a in range(len(local)):
    for b in range(a + 1, len(local)):
      out = reduce_blocks(
          local[a],
          columns([local[b]], axis_name),
          scale,
          impl=impl,
          block_size=block_size,
          axis_name=axis_name,
          column_kinds=("lse",),
      )
      positive = scale * _dot(local[a], local[b])
      terms[(a, b)] = jnp.mean(out["rows"]["lse"][0] - positive)
      terms[(b, a)] = jnp.mean(out["columns"]["lse"] - positive)
  return terms


def vsepp_loss(za, zb, *, margin, max_violation, impl, block_size, axis_name=None):
  """VSE++ hinge loss, both directions (see ``vsepp.vsepp_loss``): (loss, metrics).

  One sweep over the blocks of za.zb^T with the positives masked out: rows give a->b (hardest
  negative or hinge sum), columns b->a.
  """
  own = local_labels(za.shape[0], axis_name)
  positive = _dot(za, zb)
  kinds = ("max",) if max_violation else ("max", "hinge")
  offset = None if max_violation else margin - positive
  out = reduce_blocks(
      za,
      columns([zb], axis_name),
      impl=impl,
      block_size=block_size,
      axis_name=axis_name,
      kinds=kinds,
      column_kinds=("max",) if max_violation else ("hinge",),
      masks=lambda row, col: (col["sample"][None, :] != row["sample"][:, None],),
      row_info={"sample": own, "index": own},
      offset=offset,
      column_offset=offset,
  )
  rows, cols = out["rows"], out["columns"]
  if max_violation:  # the hardest negative (none: NEG_INF, no cost)
    loss_ab = jnp.mean(jax.nn.relu(margin + rows["max"][0] - positive))
    loss_ba = jnp.mean(jax.nn.relu(margin + cols["max"] - positive))
  else:
    loss_ab, loss_ba = jnp.mean(rows["hinge"][0]), jnp.mean(cols["hinge"])
  # a->b retrieves its own sample when the positive beats the hardest negative (ties: lower index).
  hardest, hardest_index = rows["max"][0], rows["argmax"][0]
  hit = (positive > hardest) | ((positive == hardest) & (own < hardest_index))
  return loss_ab + loss_ba, {"loss_i2t": loss_ab, "loss_t2i": loss_ba, "acc_i2t": jnp.mean(hit)}


def multi_positive_infonce(
    anchors,
    candidate_pieces,
    masks,
    *,
    temperature,
    impl,
    block_size,
    axis_name=None,
    anchor_info=None,
    candidate_info=None,
):
  """Per anchor: -log(sum_{P} e^{f.g/T} / sum_{P u N} e^{f.g/T}), with P and N given blockwise.

  Args:
    anchors: this device's anchors [A,d].
    candidate_pieces: local [B,d] arrays whose samples over all devices are the candidates (see
      :func:`columns`; candidate ``p * N + s`` is piece p of global sample s).
    masks: ``masks(anchor_info, column_info) -> (positive, negative)``, bool arrays broadcasting to
      [A, c] for a block of c candidates; ``column_info`` holds ``sample``, ``piece``, ``index``
      and the fields of ``candidate_info``. An entry in both counts once.
    anchor_info: dict of [A] arrays the masks read. candidate_info: name -> one local [B] array per
      piece.
  Returns (loss [A], valid [A]) as ``contrastive.multi_positive_infonce``.
  """

  def both(row, col):
    positive, negative = masks(row, col)
    return positive, positive | negative

  out = reduce_blocks(
      anchors,
      columns(candidate_pieces, axis_name, **(candidate_info or {})),
      1.0 / temperature,
      impl=impl,
      block_size=block_size,
      axis_name=axis_name,
      masks=both,
      n_masks=2,
      row_info=anchor_info,
  )["rows"]
  valid = out["any"][0]
  return jnp.where(valid, out["lse"][1] - out["lse"][0], 0.0), valid
