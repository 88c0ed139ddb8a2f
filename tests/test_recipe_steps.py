"""Every recipe's full train step: 8 devices equal 1 device on the same global batches and seed,
in loss, metrics and gradient (read off SGD steps), over two steps (the second step's key and state
follow from the first). The mapping (pmap or shard_map) wraps any recipe's step the same way, so
each recipe runs under one of them and each mapping under several recipes (a compile per recipe and
mapping is what this file costs)."""

import jax
import numpy as np
import optax
import pytest

from configs import clip, gcl, selfalign, solar
from mmret import step as step_lib
from mmret import train

BATCH, TEXT_LEN, IMAGE_SIZE, VOCAB_WORDS, LR = 16, 10, 16, 36, 1e-2
# Summation order differs between 8 devices and 1; values agree to float32 rounding. Gradient
# entries are compared to a tolerance scaled by the largest gradient entry: rounding in a sum of
# per-example terms is relative to the terms, not to a result that cancels to near zero (e.g. the
# gradient of an attention key bias, zero in exact arithmetic).
RTOL, ATOL, GRAD_RTOL, GRAD_ATOL = 2e-5, 2e-6, 2e-4, 1e-5


pytestmark = [pytest.mark.slow]


def _stage(config, name):
  return dict(train.stage_configs(config))[name]


# name -> (the config of the step (for multi-stage recipes, the stage), the mapping it runs under).
RECIPES = {
    # CLIP's loss, with dropout: the model runs per example, each with its own masks.
    "clip_dropout": (lambda: clip.get_config("evals=false"), "pmap"),
    # The plain contrastive method without dropout: the model runs on the batch whole (the
    # pairwise loss runs in the same step; its sharded == single-device test is in
    # test_losses_gcl.py).
    "gcl": (lambda: _stage(gcl.get_config("loss=gcl,evals=false"), gcl.FINETUNE), "shard_map"),
    "solar_stage1": (lambda: _stage(solar.get_config("evals=false"), "stage1"), "shard_map"),
    "solar_stage2": (lambda: _stage(solar.get_config("evals=false"), "stage2"), "pmap"),
    # The random-mask ablation draws per-example masks in the forward pass.
    "solar_stage2_random": (
        lambda: _stage(solar.get_config("evals=false,random_masks=true"), "stage2"),
        "shard_map",
    ),
    "selfalign": (
        lambda: _stage(selfalign.get_config("variant=both"), selfalign.HARDEST_STAGE),
        "pmap",
    ),
}


# XLA compilations (or loads from the persistent cache) of this process, as JAX reports them.
COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: (
        COMPILES.append(kwargs.get("fun_name", event))
        if event == "/jax/core/compile/backend_compile_duration"
        else None
    )
)


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "words.txt"
  path.write_text("\n".join(f"w{i}" for i in range(VOCAB_WORDS)))
  return str(path)


def _small(config, vocab_path, name):
  """The recipe's config at a size that compiles in seconds (same code paths)."""
  config.input.tokenizer = f"word:{vocab_path}"
  config.input.image_size, config.input.max_text_len = IMAGE_SIZE, TEXT_LEN
  config.input.batch_size = BATCH
  config.model.image.patch_size = 4  # a 4x4 patch grid, as the tiny recipes have
  for tower in ("image", "text", "joint"):
    config.model[tower].depth = 1
  config.model.embed_dim = 32
  if name == "clip_dropout":
    config.model.dropout = 0.2
  return config


def _batch(seed=0):
  """A global batch with ragged text and the embedded world's ground-truth fields."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, TEXT_LEN + 1, BATCH)
  text_mask = np.arange(TEXT_LEN)[None] < lengths[:, None]
  return {
      "image": rng.normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
      "text_ids": np.where(
          text_mask, rng.integers(4, VOCAB_WORDS + 4, (BATCH, TEXT_LEN)), 0
      ).astype(np.int32),
      "text_mask": text_mask,
      "text_intersection": np.where(text_mask, rng.integers(0, 3, (BATCH, TEXT_LEN)), 0).astype(
          np.int32
      ),
      "image_labels": rng.integers(0, 3, (BATCH, IMAGE_SIZE, IMAGE_SIZE)).astype(np.uint8),
  }


def _two_steps(setup, host_state, batches, kind):
  """(metrics of each step, parameter change) of two SGD steps, on one device (``kind`` None) or
  mapped over 8 devices; the change is minus the sum of the two steps' gradients."""
  if kind is None:
    state = jax.device_put(host_state, jax.devices()[0])
    fn = jax.jit(setup.step_body())
    put_batch, get_state = lambda b: b, lambda s: s
    get_metrics = lambda m: {k: float(v) for k, v in jax.device_get(m).items()}
  else:
    mapping = step_lib.DeviceMapping(kind)
    state = mapping.put_state(jax.device_put(host_state, mapping.replicated))
    fn = mapping.compile(setup.step_body())
    put_batch, get_state, get_metrics = mapping.put_batch, mapping.get_state, mapping.get_metrics
  seen = []
  for index, batch in enumerate(batches):
    compiles_before = len(COMPILES)
    state, metrics = fn(state, put_batch(batch))
    jax.block_until_ready(metrics)  # one step in flight: CPU collectives deadlock otherwise
    seen.append(get_metrics(metrics))
    if index:  # the step compiled once: later steps reuse the first step's program
      assert len(COMPILES) == compiles_before, (kind, COMPILES[compiles_before:])
  after = jax.device_get(get_state(state).params)
  return seen, jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after, host_state.params)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_step_on_8_devices_equals_1_device(name, vocab_path):
  assert jax.device_count() == 8
  make_config, kind = RECIPES[name]
  config = _small(make_config(), vocab_path, name)
  setup = train.Setup(config)
  # SGD without decay or clipping: the parameter change is minus LR times the gradients. A small
  # rate keeps the second step near the first, where no token sits on a mask threshold.
  setup.tx, setup.lr = optax.sgd(LR), optax.constant_schedule(LR)
  batches = [_batch(seed) for seed in range(2)]
  host_state = jax.device_get(setup.init_state(config, step_lib.DeviceMapping("shard_map")))
  single_metrics, single_grad = _two_steps(setup, host_state, batches, None)
  metrics, grad = _two_steps(setup, host_state, batches, kind)
  for step, (got, expected) in enumerate(zip(metrics, single_metrics), start=1):
    assert set(got) == set(expected)
    for key, value in expected.items():
      np.testing.assert_allclose(
          got[key], value, rtol=RTOL, atol=ATOL, err_msg=f"{name} {kind} step {step} {key}"
      )
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(single_grad))
  for path, a, b in zip(
      jax.tree_util.tree_leaves_with_path(grad),
      jax.tree.leaves(grad),
      jax.tree.leaves(single_grad),
  ):
    np.testing.assert_allclose(
        a,
        b,
        rtol=GRAD_RTOL,
        atol=GRAD_ATOL * scale,
        err_msg=f"{name} {kind} gradient {jax.tree_util.keystr(path[0])}",
    )
  # The step trained something: the gradient is not zero.
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(single_grad)) > 1e-6
