"""The device mapping's errors and the frozen-parameter path of the step.

That every recipe's step on 8 devices (pmap and shard_map) equals one device is
tests/test_recipe_steps.py.
"""

import functools

import jax
import numpy as np
import pytest

from mmret import config_lib, methods, optim, registry
from mmret import step as step_lib
from mmret.models.retrieval import build_model


def _batch(n, seed=0, image_size=16, text_len=8, vocab=50):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, text_len + 1, size=n)
  mask = np.arange(text_len)[None] < lengths[:, None]
  return {
      "image": rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32),
      "text_ids": np.where(mask, rng.integers(1, vocab, size=(n, text_len)), 0).astype(np.int32),
      "text_mask": mask,
  }


def _one_block_model():
  """The tiny model with one block per tower and 4 px patches (16 px images, 8 tokens)."""
  model_cfg = config_lib.model_config("tiny")
  model_cfg.image.patch_size = 4
  model_cfg.image.depth = model_cfg.text.depth = 1
  return build_model(model_cfg, vocab_size=50, max_text_len=8)


def test_batch_not_divisible_by_devices_names_the_key():
  mapping = step_lib.DeviceMapping("pmap")
  with pytest.raises(ValueError, match="text_ids"):
    mapping.put_batch({"text_ids": np.zeros((12, 4), np.int32)})


def test_unknown_mapping_is_an_error():
  with pytest.raises(ValueError, match="pmapp"):
    step_lib.DeviceMapping("pmapp")


def test_frozen_tower_gets_no_update_and_no_backward_pass():
  model = _one_block_model()
  batch = _batch(8)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
  forward, loss_fn = methods.CONTRASTIVE.make_forward(model), registry.loss("clip")

  def step_and_flops(freeze):
    optim_cfg = config_lib.optim_config(lr=1e-2, warmup_steps=1, freeze=freeze)
    tx, lr = optim.make_optimizer(optim_cfg, params, total_steps=10)
    body = jax.jit(
        functools.partial(
            step_lib.train_step,
            forward=forward,
            loss_fn=loss_fn,
            tx=tx,
            lr_schedule=lr,
            frozen_mask=optim.frozen_mask(optim_cfg, params),
        )
    )
    state = jax.device_get(
        step_lib.init_state(model, batch, tx, seed=0, mapping=step_lib.DeviceMapping("shard_map"))
    )
    flops = body.lower(state, batch).compile().cost_analysis()["flops"]
    after = body(body(state, batch)[0], batch)[0]  # the first step has learning rate 0 (warmup)
    return state, after, flops

  before, after, frozen_flops = step_and_flops("^image_tower/")
  jax.tree.map(
      np.testing.assert_array_equal, after.params["image_tower"], before.params["image_tower"]
  )
  moved = jax.tree.leaves(
      jax.tree.map(
          lambda a, b: np.abs(a - b).max(), after.params["text_tower"], before.params["text_tower"]
      )
  )
  assert max(moved) > 1e-4
  _, _, full_flops = step_and_flops("")
  # The image tower's backward pass is gone (its forward pass stays).
  assert frozen_flops < 0.9 * full_flops, (frozen_flops, full_flops)


def test_prefetched_batches_are_on_the_devices_and_checkpoints_keep_the_trained_position():
  import grain  # noqa: PLC0415

  rows = grain.MapDataset.range(64).map(lambda i: {"x": np.full((3,), i, np.int32)}).batch(8)
  mapping = step_lib.DeviceMapping("shard_map")
  prefetched = mapping.prefetch(iter(rows), depth=3)
  first = next(prefetched)
  assert isinstance(first["x"], jax.Array) and first["x"].sharding == mapping.sharded
  np.testing.assert_array_equal(np.asarray(first["x"])[:, 0], np.arange(8))
  # Three batches were read (two ahead), but the position is the one after the batch handed out.
  assert prefetched._parent.get_state() == {"next_index": 3}
  assert prefetched.get_state() == {"next_index": 1}
  saved = prefetched.get_state()
  later = [np.asarray(next(prefetched)["x"])[:, 0] for _ in range(3)]
  prefetched.set_state(saved)  # what a resume does: the batches after the saved position
  again = [np.asarray(next(prefetched)["x"])[:, 0] for _ in range(3)]
  for a, b, start in zip(later, again, (8, 16, 24)):
    np.testing.assert_array_equal(a, np.arange(start, start + 8))
    np.testing.assert_array_equal(b, a)
  rest = list(prefetched)  # the stream's end: every batch once, then StopIteration
  assert [int(np.asarray(b["x"])[0, 0]) for b in rest] == [32, 40, 48, 56]


def test_uint8_pixels_go_to_the_device_and_the_step_normalises_them():
  from mmret import train  # noqa: PLC0415

  config = config_lib.base_config(size="tiny")
  config.input.image_size, config.input.max_text_len = 16, 8
  config.model.image.patch_size = 4
  config.model.image.depth = config.model.text.depth = 1
  config.input.mean, config.input.std = (0.2, 0.5, 0.7), (0.3, 0.1, 0.25)
  setup = train.Setup(config, vocab_size=50)
  params = jax.jit(setup.model.init)(jax.random.PRNGKey(0), setup.example)["params"]
  batch = _batch(4, image_size=16)
  pixels = np.random.default_rng(3).integers(0, 256, size=(4, 16, 16, 3)).astype(np.uint8)
  # Independent reference: float64 normalisation on the host.
  reference = (pixels / 255.0 - np.array(config.input.mean)) / np.array(config.input.std)
  on_device = jax.jit(setup.predict)(params, dict(batch, image=pixels))
  on_host = jax.jit(setup.predict)(params, dict(batch, image=reference.astype(np.float32)))
  for key in ("z_image", "z_joint", "image_tokens"):
    np.testing.assert_allclose(on_device[key], on_host[key], rtol=1e-4, atol=1e-5, err_msg=key)
  # The train step's forward normalises the same way (its loss equals the host-normalised one).
  loss_fn = setup.loss_fn
  outputs = {}
  for name, image in (("device", pixels), ("host", reference.astype(np.float32))):
    run = jax.jit(
        lambda p, b: setup.forward(p, {}, b, rng=jax.random.PRNGKey(0), step=0, axis_name=None)
    )
    outputs[name] = loss_fn(run(params, dict(batch, image=image)), batch, axis_name=None)[0]
  np.testing.assert_allclose(outputs["device"], outputs["host"], rtol=1e-5)


def test_exact_gelu_and_its_gradient_match_float64_erf():
  from scipy.special import erf  # noqa: PLC0415

  from mmret.models import layers  # noqa: PLC0415

  x = np.linspace(-10.0, 10.0, 40001).astype(np.float32)
  exact = 0.5 * x.astype(np.float64) * (1.0 + erf(x.astype(np.float64) / np.sqrt(2.0)))
  slope = 0.5 * (1.0 + erf(x / np.sqrt(2.0))) + x * np.exp(-(x.astype(np.float64) ** 2) / 2.0) / (
      np.sqrt(2.0 * np.pi)
  )
  gelu = layers.activation_fn("gelu")
  np.testing.assert_allclose(np.asarray(jax.jit(gelu)(x)), exact, atol=2e-6, rtol=1e-6)
  grad = jax.jit(jax.vmap(jax.grad(gelu)))(x)
  np.testing.assert_allclose(np.asarray(grad), slope, atol=2e-6, rtol=1e-6)
  # Not the tanh approximation (which differs by up to ~5e-4 around |x| ~ 2).
  assert np.abs(np.asarray(jax.nn.gelu(x, approximate=True)) - exact).max() > 1e-4


def test_an_image_tower_refuses_pixels_nobody_normalised():
  model = _one_block_model()
  batch = _batch(2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
  raw = dict(batch, image=np.zeros((2, 16, 16, 3), np.uint8))
  with pytest.raises(TypeError, match="normalize_pixels"):
    model.apply({"params": params}, raw)
