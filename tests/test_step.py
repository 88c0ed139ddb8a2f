"""pmap, shard_map and a single-device step on the concatenated batch agree (8 fake devices)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mmret import losses, methods, optim
from mmret import step as step_lib
from mmret.models.retrieval import build_model

# float32 reductions run in a different order on 8 devices than on one. Losses and gradient norms
# agree to RTOL; parameters after Adam steps (lr 1e-2) to ATOL = 0.2% of one step's update size,
# since Adam divides by sqrt(v) and so amplifies rounding in gradients near its eps.
RTOL, ATOL = 2e-5, 2e-5


def _batch(n, seed=0, image_size=16, text_len=8, vocab=50):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, text_len + 1, size=n)
  mask = np.arange(text_len)[None] < lengths[:, None]
  return {
      "image": rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32),
      "text_ids": np.where(mask, rng.integers(1, vocab, size=(n, text_len)), 0).astype(np.int32),
      "text_mask": mask,
  }


def _setup(joint_kind="fusion"):
  model_cfg = common.model_config("tiny")
  model_cfg.image.patch_size = 4
  model_cfg.joint_kind = joint_kind
  model = build_model(model_cfg, vocab_size=50, max_text_len=8)
  optim_cfg = common.optim_config(lr=1e-2, warmup_steps=1)
  batch = _batch(16)
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  tx, lr = optim.make_optimizer(optim_cfg, params, total_steps=10)
  body = functools.partial(
      step_lib.train_step,
      forward=methods.get("contrastive").make_forward(model),
      loss_fn=losses.get("clip"),
      tx=tx,
      lr_schedule=lr,
  )
  return model, tx, body, batch


def _run(kind, model, tx, body, batch, steps=2):
  mapping = step_lib.DeviceMapping(kind)
  state = step_lib.init_state(model, batch, tx, seed=0, mapping=mapping)
  fn = mapping.compile(body)
  state = mapping.put_state(state)
  losses_seen = []
  for _ in range(steps):
    state, metrics = fn(state, mapping.put_batch(batch))
    jax.block_until_ready(state)  # one step in flight: CPU collectives deadlock otherwise
    host = mapping.get_metrics(metrics)
    losses_seen.append((host["loss"], host["grad_norm"]))
  return jax.device_get(mapping.get_state(state)), losses_seen


def _run_single(model, tx, body, batch, steps=2):
  mapping = step_lib.DeviceMapping("shard_map")
  state = jax.device_get(step_lib.init_state(model, batch, tx, seed=0, mapping=mapping))
  fn = jax.jit(functools.partial(body, axis_name=None))
  losses_seen = []
  for _ in range(steps):
    state, metrics = fn(state, batch)
    losses_seen.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return jax.device_get(state), losses_seen


@pytest.mark.parametrize("joint_kind", ["fusion", "encoder"])
def test_pmap_shard_map_and_single_device_agree(joint_kind):
  assert jax.device_count() == 8
  model, tx, body, batch = _setup(joint_kind)
  ref_state, ref_losses = _run_single(model, tx, body, batch)
  for kind in ("pmap", "shard_map"):
    state, seen = _run(kind, model, tx, body, batch)
    np.testing.assert_allclose(seen, ref_losses, rtol=RTOL, err_msg=kind)
    assert int(state.step) == 2
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=kind),
        state.params,
        ref_state.params,
    )
  # The step did something: parameters moved away from their initial values.
  init = jax.device_get(
      step_lib.init_state(model, batch, tx, seed=0, mapping=step_lib.DeviceMapping("shard_map"))
  )
  moved = jax.tree.leaves(
      jax.tree.map(lambda a, b: np.abs(a - b).max(), ref_state.params, init.params)
  )
  assert max(moved) > 1e-4


def test_batch_not_divisible_by_devices_names_the_key():
  mapping = step_lib.DeviceMapping("pmap")
  with pytest.raises(ValueError, match="text_ids"):
    mapping.put_batch({"text_ids": np.zeros((12, 4), np.int32)})


def test_unknown_mapping_is_an_error():
  with pytest.raises(ValueError, match="pmapp"):
    step_lib.DeviceMapping("pmapp")


def test_frozen_tower_gets_no_update_and_no_backward_pass():
  model_cfg = common.model_config("tiny")
  model_cfg.image.patch_size = 4
  model = build_model(model_cfg, vocab_size=50, max_text_len=8)
  batch = _batch(8)
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  forward, loss_fn = methods.get("contrastive").make_forward(model), losses.get("clip")

  def step_and_flops(freeze):
    optim_cfg = common.optim_config(lr=1e-2, warmup_steps=1, freeze=freeze)
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
