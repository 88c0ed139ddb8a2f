"""LoRA (mmret/lora.py and its wiring in train.Setup): merged kernels against a float64 reference
written from W + (alpha / r) A @ B index by index; target selection and its errors; a train step
with frozen towers (base kernels unchanged, factor gradients equal to the chain rule through an
explicitly merged model, 8 devices equal to 1); checkpoints load merged."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import clip
from mmret import checkpoint as ckpt_lib
from mmret import lora, optim, train
from mmret import step as step_lib

RANK, ALPHA = 3, 6.0


def _unflatten(flat):
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _tree(rng):
  """A hand-made parameter tree with every kind of leaf the models have."""
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  return {
      "tower": {
          "dense": {"kernel": normal(5, 7), "bias": normal(7)},
          "qkv": {"kernel": normal(6, 2, 3)},  # DenseGeneral [width, heads, head_dim]
          "attn_out": {"kernel": normal(2, 3, 6)},  # DenseGeneral [heads, head_dim, width]
          "conv": {"kernel": normal(3, 3, 4, 5), "bias": normal(5)},
          "depthwise": {"kernel": normal(3, 3, 1, 4)},
          "norm": {"scale": normal(7)},
          "token_embed": {"embedding": normal(10, 7)},
      },
      "head": {"kernel": normal(7, 4)},
      "logit_scale": np.float32(2.0),
  }


def _in_ndim(path, shape):
  return 1 if path.endswith("qkv/kernel") else len(shape) - 1


ADAPTED = {
    "tower/dense/kernel": (5, 7),
    "tower/qkv/kernel": (6, 6),
    "tower/attn_out/kernel": (6, 6),
    "tower/conv/kernel": (36, 5),
}


def _reference_delta(path, shape, a, b):
  """(alpha / r) * A @ B laid out as the kernel, entry by entry (float64)."""
  a, b = np.float64(a), np.float64(b)
  delta = np.zeros(shape)
  for index in np.ndindex(*shape):
    if path == "tower/qkv/kernel":  # [i, h, d]: row i, column h * head_dim + d
      row, col = index[0], index[1] * shape[2] + index[2]
    elif path == "tower/attn_out/kernel":  # [h, d, o]: row h * head_dim + d, column o
      row, col = index[0] * shape[1] + index[1], index[2]
    elif path == "tower/conv/kernel":  # [y, x, c, o]: row (y * kw + x) * in + c, column o
      row, col = (index[0] * shape[1] + index[1]) * shape[2] + index[2], index[3]
    else:
      row, col = index
    delta[index] = sum(a[row, r] * b[r, col] for r in range(a.shape[1]))
  return ALPHA / RANK * delta


def test_init_selects_eligible_kernels_and_starts_at_base():
  params = _tree(np.random.default_rng(0))
  factors = lora.init(params, jax.random.PRNGKey(1), rank=RANK, targets="^tower/", in_ndim=_in_ndim)
  flat = optim.param_paths(factors)
  # Biases, norms, embeddings and the depthwise conv are not adapted; 'head' is not targeted.
  assert sorted(flat) == sorted(f"{p}/{f}" for p in ADAPTED for f in ("a", "b"))
  for path, (fan_in, fan_out) in ADAPTED.items():
    a, b = np.asarray(flat[path + "/a"]), np.asarray(flat[path + "/b"])
    assert a.shape == (fan_in, RANK) and b.shape == (RANK, fan_out)
    assert a.dtype == b.dtype == np.float32
    assert np.all(b == 0)
    assert np.all(np.abs(a) <= 1 / np.sqrt(fan_in)) and np.std(a) > 0.2 / np.sqrt(fan_in)
  # B = 0: the merged tree is the base tree, bit for bit.
  merged = lora.merged(dict(params, lora=factors), alpha=ALPHA, rank=RANK)
  assert sorted(optim.param_paths(merged)) == sorted(optim.param_paths(params))
  for path, value in optim.param_paths(merged).items():
    np.testing.assert_array_equal(value, optim.param_paths(params)[path], err_msg=path)
  # The regex selects exactly what it matches among eligible kernels.
  only = lora.init(params, jax.random.PRNGKey(1), rank=RANK, targets=r"(dense|head)/kernel$")
  assert sorted(optim.param_paths(only)) == [
      "head/kernel/a",
      "head/kernel/b",
      "tower/dense/kernel/a",
      "tower/dense/kernel/b",
  ]


def test_merge_equals_base_plus_scaled_product():
  rng = np.random.default_rng(0)
  params = _tree(rng)
  factors = lora.init(params, jax.random.PRNGKey(1), rank=RANK, targets="^tower/", in_ndim=_in_ndim)
  # Trained values: B no longer zero.
  factors = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), factors)
  merged = optim.param_paths(lora.merged(dict(params, lora=factors), alpha=ALPHA, rank=RANK))
  base, flat = optim.param_paths(params), optim.param_paths(factors)
  assert "lora" not in lora.merged(dict(params, lora=factors), alpha=ALPHA, rank=RANK)
  for path, value in merged.items():
    if path in ADAPTED:
      expected = np.float64(base[path]) + _reference_delta(
          path, base[path].shape, flat[path + "/a"], flat[path + "/b"]
      )
      np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-5, atol=1e-5, err_msg=path)
      assert value.dtype == np.float32
    else:
      np.testing.assert_array_equal(value, base[path], err_msg=path)
  # Parameters without factors pass through unchanged.
  assert lora.merged(params, alpha=ALPHA, rank=RANK) is params


def test_selection_and_config_errors():
  params = _tree(np.random.default_rng(0))
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"'nothing_here' match no eligible kernel"):
    lora.init(params, key, rank=2, targets="nothing_here")
  with pytest.raises(ValueError, match=r"'\(dense' is not a valid regex"):
    lora.init(params, key, rank=2, targets="(dense")
  with pytest.raises(ValueError, match=r"depthwise"):
    lora.init(params, key, rank=2, targets="depthwise")
  with pytest.raises(ValueError, match=r"tower/dense/bias \(not a kernel\)"):
    lora.init(params, key, rank=2, targets="bias$")
  with pytest.raises(ValueError, match=r"rank must be an integer >= 1"):
    lora.init(params, key, rank=0, targets="dense")
  with pytest.raises(ValueError, match=r"in_ndim for tower/dense/kernel"):
    lora.init(params, key, rank=2, targets="dense", in_ndim=lambda p, s: 2)
  factors = lora.init(params, key, rank=2, targets="dense")
  with pytest.raises(ValueError, match=r"already hold a 'lora' subtree"):
    lora.init(dict(params, lora=factors), key, rank=2, targets="dense")
  with pytest.raises(ValueError, match=r"tower/dense/kernel.*rank=3"):
    lora.merged(dict(params, lora=factors), alpha=1.0, rank=3)
  with pytest.raises(ValueError, match=r"model.lora.rank is 0"):
    lora.merged(dict(params, lora=factors), alpha=1.0, rank=0)
  # A freeze regex that would also freeze the factors.
  with pytest.raises(ValueError, match=r"optim.freeze='tower/'.*lora/tower/dense/kernel"):
    lora.check_not_frozen("tower/", factors)
  lora.check_not_frozen("^tower/", factors)

  def cfg(**fields):
    config = clip.get_config("evals=false").model.lora
    config.update(fields)
    return config

  assert lora.config_values(cfg()) is None  # rank 0: off
  assert lora.config_values(cfg(rank=4, targets="q")) == (4, 16.0, "q")
  with pytest.raises(ValueError, match=r"model.lora.rank must be an integer >= 0"):
    lora.config_values(cfg(rank=-1))
  with pytest.raises(ValueError, match=r"model.lora.rank=4 needs model.lora.targets"):
    lora.config_values(cfg(rank=4))
  with pytest.raises(ValueError, match=r"model.lora.targets '\[' is not a valid regex"):
    lora.config_values(cfg(rank=4, targets="["))
  with pytest.raises(ValueError, match=r"model.lora.alpha must be a finite number"):
    lora.config_values(cfg(rank=4, alpha=float("nan"), targets="q"))


# ------------------------------------------------------------------------------------------------
# The train step with frozen towers and LoRA on the text tower (and the image patch embedding).

BATCH, TEXT_LEN, IMAGE_SIZE, VOCAB_WORDS = 16, 8, 16, 20
TARGETS = r"^(text_tower/|image_tower/patch_embed/)"
FREEZE = r"^(image|text)_tower/"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, setup, host state with trained-looking factors (B != 0), a batch)."""
  vocab = tmp_path_factory.mktemp("vocab") / "words.txt"
  vocab.write_text("\n".join(f"w{i}" for i in range(VOCAB_WORDS)))
  config = clip.get_config("evals=false")
  config.input.tokenizer = f"word:{vocab}"
  config.input.image_size, config.input.max_text_len = IMAGE_SIZE, TEXT_LEN
  config.input.batch_size = BATCH
  for tower in ("image", "text"):
    config.model[tower].update(width=16, depth=1, heads=2, mlp_dim=32)
  config.model.image.patch_size = 4
  config.model.joint.update(depth=1, mlp_dim=32)
  config.model.embed_dim = 16
  config.optim.freeze = FREEZE
  config.optim.warmup_steps = 0
  config.model.lora.update(rank=RANK, alpha=ALPHA, targets=TARGETS)
  setup = train.Setup(config)
  state = jax.device_get(setup.init_state(config, step_lib.DeviceMapping("shard_map")))
  rng = np.random.default_rng(0)
  batch = {
      "image": rng.normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
      "text_ids": rng.integers(4, VOCAB_WORDS + 4, (BATCH, TEXT_LEN)).astype(np.int32),
      "text_mask": np.arange(TEXT_LEN)[None] < rng.integers(3, TEXT_LEN + 1, (BATCH, 1)),
  }
  return config, setup, state, batch


def _with_random_b(state, seed=1):
  """``state`` whose B factors are non-zero (as after some training), so that A has gradients."""
  rng = np.random.default_rng(seed)
  factors = jax.tree_util.tree_map_with_path(
      lambda kp, x: (
          (0.1 * rng.normal(size=x.shape)).astype(x.dtype) if kp[-1].key == "b" else np.asarray(x)
      ),
      state.params["lora"],
  )
  return state.replace(params=dict(state.params, lora=factors))


def _grad_catcher():
  """An 'optimizer' that applies nothing and keeps the step's (device-averaged) gradients."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, _, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


def _body(setup, tx):
  return functools.partial(
      step_lib.train_step,
      forward=setup.forward,
      loss_fn=setup.loss_fn,
      tx=tx,
      lr_schedule=setup.lr,
      frozen_mask=setup.frozen_mask,
  )


def _one_device_grads(setup, state, batch):
  """(metrics, gradients) of one step on one device."""
  tx = _grad_catcher()
  state = state.replace(opt_state=tx.init(state.params))
  new, metrics = jax.jit(_body(setup, tx))(jax.device_put(state, jax.devices()[0]), batch)
  return jax.device_get(metrics), jax.device_get(new.opt_state)


@pytest.fixture(scope="module")
def single_device(tiny):
  """(state with B != 0, its one-device step's metrics, its gradients)."""
  _, setup, state, batch = tiny
  state = _with_random_b(state)
  return (state,) + _one_device_grads(setup, state, batch)


def test_setup_wiring(tiny):
  config, setup, state, _ = tiny
  paths = optim.param_paths(state.params)
  factors = sorted(p for p in paths if p.startswith("lora/"))
  kernels = sorted({p[len("lora/") : -len("/a")] for p in factors})
  assert kernels == sorted(
      p
      for p in paths
      if p.endswith("/kernel") and (p.startswith("text_tower/") or "patch_embed" in p)
  )
  assert "image_tower/patch_embed/kernel" in kernels  # a conv kernel [4, 4, 3, 16]
  # The frozen mask covers the towers, not the factors.
  mask = optim.param_paths(setup.frozen_mask)
  assert set(mask) == set(paths)
  assert all(mask[p] == bool(p.startswith(("image_tower/", "text_tower/"))) for p in paths)
  # The restore shapes include the factors.
  abstract = setup.abstract_state(step_lib.DeviceMapping("shard_map"))
  assert jax.tree.map(lambda x: x.shape, abstract.params) == jax.tree.map(np.shape, state.params)
  # A freeze regex that also matches the factors is refused when the setup is built.
  bad = config.copy_and_resolve_references()
  bad.optim.freeze = "(image|text)_tower/"
  with pytest.raises(ValueError, match=r"also freezes LoRA factors"):
    train.Setup(bad)
  with pytest.raises(ValueError, match=r"hold LoRA factors"):
    setup.init_state(config, step_lib.DeviceMapping("shard_map"), params=state.params)


def test_step_keeps_frozen_base_and_trains_factors(tiny):
  _, setup, state, batch = tiny
  # From initialisation (B = 0), two AdamW steps (the first one's learning rate is 0: warmup).
  step = jax.jit(setup.step_body())
  new = jax.device_put(state, jax.devices()[0])
  for _ in range(2):
    new, metrics = step(new, batch)
    assert np.isfinite(float(metrics["loss"]))
  before, after = optim.param_paths(state.params), optim.param_paths(jax.device_get(new.params))
  for path, value in before.items():
    if path.startswith(("image_tower/", "text_tower/")):
      np.testing.assert_array_equal(after[path], value, err_msg=path)
    elif path.startswith("lora/"):  # the factors train: B from 0, A once B is not 0
      assert np.any(after[path] != value), path
      assert not path.endswith("/b") or np.all(value == 0), path


def test_factor_gradients_follow_the_chain_rule(tiny, single_device):
  """Step gradients against jax.grad of the loss at an explicitly merged model (float64 merge)
  and the chain rule dL/dA = s G B^T, dL/dB = s A^T G, with G = dL/dW' (float64)."""
  _, setup, _, batch = tiny
  state, metrics, grads = single_device
  grads = optim.param_paths(grads)
  params = optim.param_paths(state.params)
  scale = ALPHA / RANK
  explicit = {}
  for path, value in params.items():
    if path.startswith("lora/"):
      continue
    if f"lora/{path}/a" in params:
      a, b = np.float64(params[f"lora/{path}/a"]), np.float64(params[f"lora/{path}/b"])
      value = (np.float64(value) + scale * (a @ b).reshape(value.shape)).astype(np.float32)
    explicit[path] = np.asarray(value)
  explicit = jax.tree.map(jnp.asarray, _unflatten(explicit))
  forward = setup.method.make_forward(setup.model, **setup.method_hparams)
  rng = jax.random.fold_in(state.rng, state.step)

  def loss(p):
    outputs = forward(p, state.frozen, batch, rng=rng, step=state.step, axis_name=None)
    return setup.loss_fn(outputs, batch, axis_name=None)[0]

  value, g = jax.jit(jax.value_and_grad(loss))(explicit)
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
  g = optim.param_paths(jax.device_get(g))
  gmax = max(float(np.abs(x).max()) for x in g.values())
  checked = 0
  for path, grad in grads.items():
    grad = np.asarray(grad)
    if path.startswith(("image_tower/", "text_tower/")):
      assert np.all(grad == 0), f"frozen {path} has a gradient"
      continue
    if path.startswith("lora/"):
      kernel, factor = path[len("lora/") :].rsplit("/", 1)
      a, b = np.float64(params[f"lora/{kernel}/a"]), np.float64(params[f"lora/{kernel}/b"])
      gw = np.float64(g[kernel]).reshape(a.shape[0], b.shape[1])
      expected = scale * (gw @ b.T if factor == "a" else a.T @ gw)
      checked += 1
    else:
      expected = g[path]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6 * gmax, err_msg=path)
  assert checked == sum(p.startswith("lora/") for p in params) > 0
  assert all(np.any(np.asarray(grads[p]) != 0) for p in params if p.startswith("lora/"))


@pytest.mark.parametrize("kind", ["shard_map", "pmap"])
def test_step_on_8_devices_equals_1_device(tiny, single_device, kind):
  assert jax.device_count() == 8
  _, setup, _, batch = tiny
  state, single_metrics, single_grads = single_device
  tx = _grad_catcher()
  state = state.replace(opt_state=tx.init(state.params))
  mapping = step_lib.DeviceMapping(kind)
  fn = mapping.compile(_body(setup, tx))
  new, metrics = fn(
      mapping.put_state(jax.device_put(state, mapping.replicated)), mapping.put_batch(batch)
  )
  jax.block_until_ready(metrics)
  metrics = mapping.get_metrics(metrics)
  grads = jax.device_get(mapping.get_state(new).opt_state)
  for key, value in single_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=2e-5, atol=2e-6, err_msg=key)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(single_grads))
  flat, single = optim.param_paths(grads), optim.param_paths(single_grads)
  assert set(flat) == set(single)
  for path, value in single.items():
    np.testing.assert_allclose(flat[path], value, rtol=2e-4, atol=1e-5 * scale, err_msg=path)
  assert all(np.any(np.asarray(single[p]) != 0) for p in single if p.startswith("lora/"))


def test_load_params_returns_merged_weights(tiny, single_device, tmp_path):
  config, setup, _, batch = tiny
  state = single_device[0]
  mapping = step_lib.DeviceMapping(config.mapping)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False)
  checkpointer.save(1, jax.device_put(state, mapping.replicated), wait=True)
  checkpointer.close()
  loaded = optim.param_paths(jax.device_get(train.load_params(config, str(tmp_path))))
  params = optim.param_paths(state.params)
  assert not any(p.startswith("lora/") for p in loaded)
  assert set(loaded) == {p for p in params if not p.startswith("lora/")}
  for path, value in loaded.items():
    expected = np.float64(params[path])
    if f"lora/{path}/a" in params:
      a, b = np.float64(params[f"lora/{path}/a"]), np.float64(params[f"lora/{path}/b"])
      expected = expected + ALPHA / RANK * (a @ b).reshape(expected.shape)
      assert np.abs(expected - params[path]).max() > 1e-3  # the factors moved this kernel
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=path)
  # predict gives the same outputs on the stored (factored) and the loaded (merged) parameters.
  predict = jax.jit(setup.predict)
  out_factored = predict(state.params, batch)
  out_merged = predict(_unflatten(loaded), batch)
  for key in out_factored:
    np.testing.assert_allclose(out_merged[key], out_factored[key], rtol=1e-4, atol=1e-5)
