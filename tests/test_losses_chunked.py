"""Chunked and ring losses (mmret/losses/chunked.py) equal the dense ones: value, gradients w.r.t.
the embeddings and logit_scale, and metrics, on one device and on 8 (shard_map and pmap), with
block sizes that do and do not divide the columns; their compiled memory stays flat in the batch."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from sharding import N_DEVICES

from mmret import config_lib, train
from mmret.losses import chunked, contrastive, gcl, vsepp
from mmret.recipes.solar import losses as solar_losses

KEYS = ("z_image", "z_text", "z_joint")
LOCAL_BATCH = 3  # per device: 8 x 3 = 24 samples, 72 columns for GCL and SOLAR stage 2
N = N_DEVICES * LOCAL_BATCH
IN_DIM, DIM = 5, 6


def _stage2(symmetric):
  def loss(o, x, **kw):
    value = solar_losses.stage2_contrastive_loss(
        o["z_image"],
        o["z_text"],
        o["z_joint"],
        x["has_positive"],
        x["has_negative"],
        temperature=0.1,
        symmetric=symmetric,
        **kw,
    )
    return value, {}

  return loss


CASES = (
    {  # name -> fn(outputs, inputs, **kw) -> (loss, metrics), learnable logit_scale unless fixed
        "clip": lambda o, x, **kw: contrastive.clip_loss(o, {}, **kw),
        "gcl": lambda o, x, **kw: gcl.gcl_loss(o, {}, **kw),
        "gcl_drop": lambda o, x, **kw: gcl.gcl_loss(o, {}, drop_other_positive=True, **kw),
        "pairwise": lambda o, x, **kw: gcl.pairwise_loss(o, {}, **kw),
        "vsepp": lambda o, x, **kw: vsepp.vsepp_loss(o, {}, margin=0.5, **kw),
        "vsepp_sum": lambda o, x, **kw: vsepp.vsepp_loss(o, {}, max_violation=False, **kw),
        "stage2": _stage2(symmetric=True),
        "stage2_one_way": _stage2(symmetric=False),
    }
)


def _data():
  rng = np.random.default_rng(0)
  inputs = {k: rng.normal(size=(N, IN_DIM)).astype(np.float32) for k in KEYS}
  inputs["has_positive"] = rng.uniform(size=N) < 0.7
  inputs["has_negative"] = rng.uniform(size=N) < 0.6
  params = {k: rng.normal(size=(IN_DIM, DIM)).astype(np.float32) for k in KEYS}
  params["logit_scale"] = np.float32(np.log(1 / 0.2))
  return params, inputs


def _embed(params, inputs):
  outputs = {k: inputs[k] @ params[k] for k in KEYS}
  outputs = {k: v / jnp.linalg.norm(v, axis=-1, keepdims=True) for k, v in outputs.items()}
  return dict(outputs, logit_scale=params["logit_scale"])


def _losses(params, inputs, names, axis_name=None, **impl):
  """{name: {loss, grads, metrics}} of every case in ``names``."""
  results = {}
  for name in names:

    def objective(p, name=name):
      return CASES[name](_embed(p, inputs), inputs, axis_name=axis_name, **impl)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    results[name] = {"loss": loss, "grads": grads, "metrics": metrics}
  return results


@functools.cache
def _dense():
  params, inputs = _data()
  out = jax.jit(functools.partial(_losses, names=tuple(CASES)))(params, inputs)
  return jax.tree.map(np.asarray, jax.block_until_ready(out))


def _assert_equals_dense(got, names):
  want = _dense()
  for name in names:
    g, w = got[name], want[name]
    np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5, err_msg=name)
    for key in w["grads"]:
      np.testing.assert_allclose(
          g["grads"][key], w["grads"][key], rtol=1e-5, atol=1e-5, err_msg=f"{name} d/d{key}"
      )
    assert set(g["metrics"]) == set(w["metrics"]), name
    for key in w["metrics"]:
      np.testing.assert_allclose(g["metrics"][key], w["metrics"][key], rtol=1e-5, err_msg=key)
    # The comparison proves something: every embedding map gets a gradient.
    used = KEYS[:2] if name in ("clip", "vsepp", "vsepp_sum") else KEYS
    assert all(np.abs(w["grads"][k]).max() > 1e-3 for k in used), name
    if name in ("clip", "gcl", "gcl_drop", "pairwise"):
      assert abs(float(w["grads"]["logit_scale"])) > 1e-3, name


def _sharded(mapping, names, **impl):
  """The cases on 8 devices, each holding LOCAL_BATCH rows; loss, gradients and metrics pmean'd."""
  params, inputs = _data()

  def per_device(p, x):
    return jax.lax.pmean(_losses(p, x, names, axis_name="d", **impl), "d")

  if mapping == "shard_map":
    mesh = jax.make_mesh((N_DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    fn = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("d")), out_specs=P(), check_vma=False)
    )
    out = fn(params, inputs)
  else:
    split = {k: v.reshape((N_DEVICES, LOCAL_BATCH) + v.shape[1:]) for k, v in inputs.items()}
    out = jax.pmap(per_device, axis_name="d", in_axes=(None, 0))(params, split)
    out = jax.tree.map(lambda v: v[0], out)
  return jax.tree.map(np.asarray, jax.block_until_ready(out))


# --- the dense value against float64 formulas ------------------------------------------------------


def _clip_reference(za, zb, scale):
  """Symmetric InfoNCE with explicit loops, float64."""
  za, zb = np.float64(za), np.float64(zb)
  n = len(za)
  terms = []
  for anchors, others in ((za, zb), (zb, za)):
    total = 0.0
    for i in range(n):
      denominator = sum(np.exp(scale * anchors[i] @ others[j]) for j in range(n))
      total += -np.log(np.exp(scale * anchors[i] @ others[i]) / denominator)
    terms.append(total / n)
  return 0.5 * (terms[0] + terms[1])


def _stage2_one_way_reference(fa, fp, fn, has_positive, has_negative, tau):
  """Stage 2 (non-symmetric) with explicit loops, float64: each original anchors its positive."""
  views = [np.float64(v) for v in (fa, fp, fn)]
  valid_view = [np.ones(len(fa), bool), has_positive, has_negative]
  total, count = 0.0, 0
  for i in range(len(fa)):
    if not has_positive[i]:
      continue
    positive = np.exp(views[0][i] @ views[1][i] / tau)
    denominator = positive
    for view, k in itertools.product(range(3), range(len(fa))):
      if k == i:
        if view == 2 and has_negative[i]:
          denominator += np.exp(views[0][i] @ views[2][i] / tau)
      elif valid_view[view][k]:
        denominator += np.exp(views[0][i] @ views[view][k] / tau)
    total += -np.log(positive / denominator)
    count += 1
  return total / count


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_clip_and_stage2_match_float64_formulas(impl):
  params, inputs = _data()
  outputs = jax.tree.map(np.asarray, _embed(params, inputs))
  scale = float(np.exp(params["logit_scale"]))
  kw = {} if impl == "dense" else {"impl": impl, "block_size": 5}

  @jax.jit
  def losses(outputs, inputs):
    return CASES["clip"](outputs, {}, **kw)[0], CASES["stage2_one_way"](outputs, inputs, **kw)[0]

  clip, stage2 = losses(outputs, inputs)
  want = _clip_reference(outputs["z_image"], outputs["z_text"], scale)
  np.testing.assert_allclose(clip, want, rtol=1e-5)
  want = _stage2_one_way_reference(
      outputs["z_image"],
      outputs["z_text"],
      outputs["z_joint"],
      inputs["has_positive"],
      inputs["has_negative"],
      0.1,
  )
  np.testing.assert_allclose(stage2, want, rtol=1e-5)


# --- chunked and ring == dense --------------------------------------------------------------------


def test_single_device_chunked_equals_dense():
  # 5 divides neither the 24 columns of CLIP, pairwise and VSE++ nor the 72 of GCL and stage 2.
  params, inputs = _data()
  fn = functools.partial(_losses, names=tuple(CASES), impl="chunked", block_size=5)
  got = jax.tree.map(np.asarray, jax.jit(fn)(params, inputs))
  _assert_equals_dense(got, CASES)


@pytest.mark.parametrize(
    "mapping,impl,block_size",
    [
        ("shard_map", "chunked", 5),  # divides neither the gathered 24 nor the 72 columns
        ("shard_map", "ring", 2),  # divides neither a device's 3 nor its 9 columns
        ("pmap", "ring", 3),  # divides both
    ],
)
def test_sharded_equals_single_device_dense(mapping, impl, block_size):
  names = tuple(CASES) if mapping == "shard_map" else ("clip", "gcl_drop", "vsepp", "stage2")
  got = _sharded(mapping, names, impl=impl, block_size=block_size)
  _assert_equals_dense(got, names)


def test_ties_pick_the_first_column_like_dense():
  """Identical candidates: the arg max (accuracy metrics) and the hardest negative agree."""
  e = np.eye(DIM, dtype=np.float32)
  # Texts 0 and 4 are identical, so image 0 ties between them (its own first: a hit only if the
  # first tied column wins); image 4 has its best match elsewhere, so the tie is not symmetric.
  text = e[[0, 1, 2, 3, 0, 5, 4, 4]]
  image = e[[0, 1, 2, 3, 5, 5, 4, 4]]
  outputs = {"z_image": image, "z_text": text, "z_joint": text, "logit_scale": np.float32(1.0)}
  names = ("clip", "gcl", "vsepp")

  @jax.jit
  def losses(outputs):
    dense = {name: CASES[name](outputs, {}) for name in names}
    flat = {name: CASES[name](outputs, {}, impl="chunked", block_size=3) for name in names}
    return dense, flat

  dense, flat = losses(outputs)
  for name in names:
    np.testing.assert_allclose(flat[name][0], dense[name][0], rtol=1e-6, err_msg=name)
    for key, value in dense[name][1].items():
      np.testing.assert_allclose(flat[name][1][key], value, rtol=1e-6, err_msg=f"{name} {key}")


# --- configuration and errors ---------------------------------------------------------------------


def test_config_selects_the_implementation():
  params, inputs = _data()
  outputs = _embed(params, inputs)
  config = config_lib.base_config()
  dense_loss, _ = train.loss_function(config)(outputs, {})
  config.loss.impl, config.loss.block_size = "chunked", 7
  chunked_loss, _ = jax.jit(train.loss_function(config))(outputs, {})
  np.testing.assert_allclose(chunked_loss, dense_loss, rtol=1e-5)


@pytest.mark.parametrize("name", ["clip", "gcl", "pairwise", "vsepp", "stage2"])
def test_unknown_impl_or_block_size_is_an_error_naming_it(name):
  params, inputs = _data()
  outputs = _embed(params, inputs)
  with pytest.raises(ValueError, match=r"loss\.impl must be one of .*got 'sparse'"):
    CASES[name](outputs, inputs, impl="sparse")
  with pytest.raises(ValueError, match=r"loss\.block_size must be a positive integer, got 0"):
    CASES[name](outputs, inputs, impl="ring", block_size=0)


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "gcl"])
def test_compiled_memory_holds_no_logits_matrix(name):
  """Loss and gradient at 2048 samples: the dense program holds [N, N] logits (16 MiB each), the
  chunked one no more than a few [N, block] blocks next to the embeddings."""
  n, dim, block = 2048, 16, 64
  keys = KEYS if name == "gcl" else KEYS[:2]
  shapes = {k: jax.ShapeDtypeStruct((n, dim), jnp.float32) for k in keys}
  shapes["logit_scale"] = jax.ShapeDtypeStruct((), jnp.float32)

  def temp_bytes(**impl):
    fn = jax.value_and_grad(lambda o: CASES[name](o, {}, **impl)[0])
    return jax.jit(fn).lower(shapes).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = n * n * 4
  assert temp_bytes() > logits_bytes
  flat = temp_bytes(impl="chunked", block_size=block)
  rows = n * (len(keys) if name == "gcl" else 1)  # GCL: the anchors of every modality
  assert flat < 6 * rows * block * 4  # a few [rows, block] float32 blocks
  assert flat < logits_bytes / 2
