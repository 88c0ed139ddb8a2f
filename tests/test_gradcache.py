"""GradCache (``optim.microbatches``): loss, metrics and gradient equal the whole-batch step's
(dense, chunked and ring losses), on one device and on 8; SOLAR (whose forward couples the batch)
and indivisible batches are refused; the compiled step needs less temporary memory with
micro-batches."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import clip, gcl, selfalign, solar
from mmret import gradcache, train

BATCH, TEXT_LEN, IMAGE_SIZE, VOCAB_WORDS = 16, 8, 16, 36
N_DEVICES = 8
# Micro-batches change the summation order of the parameter gradient (a sum over micro-batches of
# per-example terms): gradient entries agree to float32 rounding relative to the largest entry.
RTOL, ATOL, GRAD_RTOL, GRAD_ATOL = 2e-5, 1e-6, 1e-4, 2e-6


def _vsepp():
  config = clip.get_config("evals=false")
  config.loss = ml_collections.ConfigDict({"name": "vsepp"})
  return config


def _with_loss(config, **fields):
  config.loss.update(fields)
  return config


def _stage(config, name):
  return dict(train.stage_configs(config))[name]


# CLIP's loss runs with dropout (the model then runs per example); the others without (the model
# runs on the micro-batch whole). gcl's and CLIP's logit scale and SelfAlign's prototypes are
# outputs shared by the batch, whose gradient is back-propagated once.
RECIPES = {
    # Dropout: every example draws its masks from its own key, which micro-batches must keep.
    "clip_dropout": lambda: clip.get_config("evals=false"),
    "gcl": lambda: _stage(gcl.get_config("loss=gcl,evals=false"), gcl.FINETUNE),
    "vsepp": _vsepp,
    "selfalign": lambda: _stage(selfalign.get_config("variant=both"), selfalign.HARDEST_STAGE),
    # The block-wise losses (custom VJPs) under GradCache: the cached embeddings' gradient comes
    # from their backward, on one device (chunked) and across 8 (ring).
    "gcl_chunked": lambda: _with_loss(
        _stage(gcl.get_config("loss=gcl,evals=false"), gcl.FINETUNE), impl="chunked", block_size=4
    ),
    "clip_ring": lambda: _with_loss(clip.get_config("evals=false"), impl="ring", block_size=2),
}


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "words.txt"
  path.write_text("\n".join(f"w{i}" for i in range(VOCAB_WORDS)))
  return str(path)


def _small(config, vocab_path, *, dropout=0.0, batch=BATCH, image_size=IMAGE_SIZE, depth=1):
  config.input.tokenizer = f"word:{vocab_path}"
  config.input.image_size, config.input.max_text_len = image_size, TEXT_LEN
  config.input.batch_size = batch
  config.model.image.patch_size = 4
  for tower in ("image", "text", "joint"):
    config.model[tower].depth = depth
  config.model.embed_dim = 32
  config.model.dropout = dropout
  return config


def _batch(n=BATCH, seed=0, image_size=IMAGE_SIZE):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, TEXT_LEN + 1, n)
  text_mask = np.arange(TEXT_LEN)[None] < lengths[:, None]
  return {
      "image": rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32),
      "text_ids": np.where(text_mask, rng.integers(4, VOCAB_WORDS + 4, (n, TEXT_LEN)), 0).astype(
          np.int32
      ),
      "text_mask": text_mask,
  }


def _value_and_grad(setup, params, batch, rng, microbatches, axis_name=None):
  """((loss, metrics), grads): the whole-batch autodiff (``microbatches`` 1) or GradCache."""
  step = jnp.zeros((), jnp.int32)
  if microbatches == 1:

    def objective(p):
      outputs = setup.forward(p, {}, batch, rng=rng, step=step, axis_name=axis_name)
      return setup.loss_fn(outputs, batch, axis_name=axis_name)

    return jax.value_and_grad(objective, has_aux=True)(params)
  return gradcache.value_and_grad(
      params,
      {},
      batch,
      forward=setup.forward,
      loss_fn=setup.loss_fn,
      microbatches=microbatches,
      rng=rng,
      step=step,
      axis_name=axis_name,
      frozen_mask=setup.frozen_mask,
  )


def _on_8_devices(setup, params, batch, rng, microbatches):
  """GradCache with the batch split over 8 devices; loss, metrics and gradient pmean'ed."""

  def per_device(p, x):
    result = _value_and_grad(setup, p, x, rng, microbatches, axis_name="d")
    return jax.lax.pmean(result, "d")

  mesh = jax.make_mesh((N_DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  mapped = jax.jit(
      jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("d")), out_specs=P(), check_vma=False)
  )
  return jax.block_until_ready(mapped(params, batch))


def _assert_same(got, expected, what):
  (loss, metrics), grads = jax.device_get(got)
  (want_loss, want_metrics), want_grads = jax.device_get(expected)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL, err_msg=f"{what} loss")
  assert set(metrics) == set(want_metrics)
  for key in want_metrics:
    np.testing.assert_allclose(
        metrics[key], want_metrics[key], rtol=RTOL, atol=ATOL, err_msg=f"{what} {key}"
    )
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
  assert scale > 1e-6  # the gradient is not zero: the comparison proves something
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True
  ):
    np.testing.assert_allclose(
        a,
        b,
        rtol=GRAD_RTOL,
        atol=GRAD_ATOL * scale,
        err_msg=f"{what} gradient {jax.tree_util.keystr(path)}",
    )


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_microbatches_equal_whole_batch(name, vocab_path):
  config = _small(RECIPES[name](), vocab_path, dropout=0.2 if name == "clip_dropout" else 0.0)
  setup = train.Setup(config)
  params = jax.jit(setup.model.init)(jax.random.PRNGKey(1), setup.example)["params"]
  batch, rng = _batch(), jax.random.PRNGKey(7)
  expected = jax.jit(functools.partial(_value_and_grad, setup, microbatches=1))(params, batch, rng)
  # Micro-batches of 4 (per-example dropout keys must follow the example, not its micro-batch).
  got = jax.jit(functools.partial(_value_and_grad, setup, microbatches=4))(params, batch, rng)
  _assert_same(got, expected, f"{name} microbatches=4")
  # 8 devices, 2 examples each, in micro-batches of one: for dropout's per-example keys and
  # SelfAlign's shared prototypes (the gcl and VSE++ losses' own sharded == single-device tests
  # are in test_losses_gcl.py and test_losses_chunked.py).
  if name in ("clip_dropout", "selfalign", "clip_ring"):
    _assert_same(_on_8_devices(setup, params, batch, rng, 2), expected, f"{name} 8 devices")


def test_train_step_with_microbatches_equals_plain_step(vocab_path):
  """The config flag reaches the step: an SGD step's loss, gradient norm and update match."""
  results = []
  for k in (1, 4):
    config = _small(clip.get_config("evals=false"), vocab_path)
    config.optim.microbatches = k
    setup = train.Setup(config)
    assert setup.microbatches == k
    setup.tx, setup.lr = optax.sgd(1.0), optax.constant_schedule(1.0)
    state = setup.init_state(config, train.step_lib.DeviceMapping("shard_map"))
    state = jax.device_put(jax.device_get(state), jax.devices()[0])
    new_state, metrics = jax.jit(setup.step_body())(state, _batch())
    update = jax.tree.map(
        lambda a, b: np.asarray(a) - np.asarray(b), new_state.params, state.params
    )
    results.append((jax.device_get(metrics), update))
  (plain_metrics, plain_update), (metrics, update) = results
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], plain_metrics[key], rtol=RTOL, err_msg=key)
  scale = max(float(np.abs(u).max()) for u in jax.tree.leaves(plain_update))
  for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(plain_update), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)


def test_solar_is_refused_by_name(vocab_path):
  config = _small(_stage(solar.get_config("evals=false"), "stage1"), vocab_path)
  config.optim.microbatches = 2
  with pytest.raises(ValueError, match=r"solar_stage1.*couples"):
    train.Setup(config)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_microbatches_is_an_error(bad):
  with pytest.raises(ValueError, match=r"optim\.microbatches must be a positive integer"):
    gradcache.check(bad, train.registry.method("contrastive"), "contrastive")


def test_indivisible_batch_is_an_error(vocab_path):
  setup = train.Setup(_small(clip.get_config("evals=false"), vocab_path))
  params = jax.eval_shape(setup.model.init, jax.random.PRNGKey(0), setup.example)["params"]
  batch = _batch(n=6)
  with pytest.raises(ValueError, match=r"batch\['image'\] has 6 examples.*microbatches=4"):
    jax.eval_shape(
        functools.partial(_value_and_grad, setup, microbatches=4),
        params,
        batch,
        jax.random.PRNGKey(0),
    )


def _temp_bytes(vocab_path, microbatches, batch):
  """Temporary memory of the compiled train step (XLA's memory analysis)."""
  config = _small(clip.get_config("evals=false"), vocab_path, batch=batch, image_size=32)
  config.optim.microbatches = microbatches
  setup = train.Setup(config)
  state = setup.abstract_state(train.step_lib.DeviceMapping("shard_map"))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(batch, 0, 32))
  compiled = jax.jit(setup.step_body()).lower(state, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_micro_batches_need_less_temporary_memory(vocab_path):
  whole, micro = (_temp_bytes(vocab_path, k, batch=64) for k in (1, 4))
  print(f"temp bytes at batch 64: microbatches=1 {whole}, microbatches=4 {micro}")
  assert micro < 0.6 * whole, (micro, whole)
