"""The training loop: data -> state -> step -> log / evaluate / checkpoint, read top to bottom.

``run(config, workdir)`` is everything ``mmret.main`` does after parsing flags; tests call it
directly. Starting with a workdir that holds a checkpoint resumes from it.
"""
import functools
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mmret import checkpoint as ckpt_lib
from mmret import losses, metrics_writer, optim
from mmret import step as step_lib
from mmret.data import pipeline, sources
from mmret.models.retrieval import build_model


class NonFiniteLossError(FloatingPointError):
  pass


def example_batch(input_cfg, batch_size: int = 1) -> dict:
  """Zeros shaped like a training batch (for initialisation and shape inference)."""
  size, length = input_cfg.image_size, input_cfg.max_text_len
  return {"image": np.zeros((batch_size, size, size, 3), np.float32),
          "text_ids": np.zeros((batch_size, length), np.int32),
          "text_mask": np.ones((batch_size, length), bool)}


def check_batch_size(config):
  devices, processes = jax.device_count(), jax.process_count()
  if config.input.batch_size % devices:
    raise ValueError(f"input.batch_size={config.input.batch_size} is not divisible by the "
                     f"{devices} devices")
  if config.input.batch_size % processes:
    raise ValueError(f"input.batch_size={config.input.batch_size} is not divisible by the "
                     f"{processes} processes")


def prepare_data(config):
  """Prepares missing embedded datasets once (process 0) before any process reads them."""
  datasets = {src["dataset"] for src in config.input.train}
  datasets |= {cfg.dataset for cfg in config.get("evals", {}).values() if "dataset" in cfg}
  if jax.process_index() == 0:
    for dataset in sorted(datasets):
      sources.load_builder(dataset, config.input.data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mmret: datasets prepared")


def build(config):
  """Model, optimizer and forward/loss functions for ``config`` (no state, no data)."""
  tokenizer = pipeline.tokenizer_for(config.input)
  model = build_model(config.model, vocab_size=tokenizer.vocab_size,
                      max_text_len=config.input.max_text_len)
  abstract_params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), example_batch(config.input))["params"])
  tx, lr = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
  hparams = {k: v for k, v in config.loss.to_dict().items() if k != "name"}
  loss_fn = functools.partial(losses.get(config.loss.name), **hparams)
  return model, tx, lr, loss_fn


def make_predict_fn(model, params):
  """Inference-mode model outputs for a batch, with the given (canonical) parameters."""
  apply = jax.jit(lambda p, batch: model.apply({"params": p}, batch, train=False))
  return lambda batch: apply(params, batch)


class _LossWatch:
  """Collects per-step losses on device; raises on the first non-finite one when checked."""

  def __init__(self):
    self.pending = []

  def add(self, step: int, loss):
    self.pending.append((step, loss))

  def check(self, last_good_checkpoint):
    values = jax.device_get([loss for _, loss in self.pending])
    for (step, _), value in zip(self.pending, values):
      value = float(np.asarray(value).reshape(-1)[0])
      if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value} at step {step}; stopping. Last good checkpoint: "
            f"{last_good_checkpoint or 'none (no checkpoint saved yet)'}")
    self.pending = []


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run(config, workdir: str):
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint); returns final metrics."""
  check_batch_size(config)
  os.makedirs(workdir, exist_ok=True)
  prepare_data(config)
  is_writer = jax.process_index() == 0
  if is_writer:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  model, tx, lr, loss_fn = build(config)
  mapping = step_lib.DeviceMapping(config.mapping)
  # On CPU, collectives of steps dispatched back to back can deadlock XLA's rendezvous:
  # keep at most one step in flight there.
  block_every_step = jax.devices()[0].platform == "cpu" and jax.device_count() > 1

  data_iter = pipeline.make_train_iterator(
      config.input, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  state = step_lib.init_state(model, example_batch(config.input), tx, seed=config.seed,
                              mapping=mapping)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_ckpts)
  last_ckpt = checkpointer.latest_step()
  if last_ckpt is not None:
    state = checkpointer.restore(ckpt_lib.abstract_like(state), data_iter, step=last_ckpt)
    logging.info("Resumed from %s at step %d", checkpointer.directory, last_ckpt)
  start = int(jax.device_get(state.step))

  train_fn = mapping.compile(functools.partial(
      step_lib.train_step, forward=step_lib.make_forward(model), loss_fn=loss_fn, tx=tx,
      lr_schedule=lr))
  native_state = mapping.put_state(state)
  writer = metrics_writer.MetricWriter(workdir, enabled=is_writer)
  watch = _LossWatch()
  last_good = (os.path.join(checkpointer.directory, str(last_ckpt))
               if last_ckpt is not None else None)

  def save(step, *, force=False):
    nonlocal last_good
    watch.check(last_good)  # never checkpoint past a non-finite loss
    if checkpointer.save(step, mapping.get_state(native_state), data_iter, force=force):
      last_good = os.path.join(checkpointer.directory, str(step))

  def evaluate(step, final):
    from mmret import evals  # imported lazily: training without evals needs no search libs
    due = {name: cfg for name, cfg in config.evals.items()
           if final or step % (cfg.get("every") or config.eval_every or step + 1) == 0}
    if not due:
      return {}
    params = mapping.get_state(native_state).params
    results = evals.run_evals(make_predict_fn(model, params), due, config.input, step=step,
                              workdir=workdir)
    writer.write(step, results)
    return results

  examples_per_step = config.input.batch_size
  interval_start, interval_steps, metrics = time.time(), 0, None
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = mapping.put_batch(next(data_iter))
      native_state, metrics = train_fn(native_state, batch)
      watch.add(step, metrics["loss"])
      if block_every_step:
        jax.block_until_ready(metrics)
      interval_steps += 1
      if step == start + 1:  # the first step compiles: keep it out of the throughput figure
        jax.block_until_ready(metrics)
        interval_start, interval_steps = time.time(), 0
      if step % config.log_every == 0 or step == config.total_steps:
        watch.check(last_good)
        host = mapping.get_metrics(metrics)
        elapsed = time.time() - interval_start
        timing = ""
        if interval_steps:  # empty right after the (compiling) first step
          per_device = examples_per_step * interval_steps / elapsed / jax.device_count()
          host["examples_per_sec_per_device"] = per_device
          eta = elapsed / interval_steps * (config.total_steps - step)
          timing = f" | {per_device:.1f} examples/s/device | ETA {_format_eta(eta)}"
        writer.write(step, host)
        logging.info("step %d/%d | loss %.4f%s", step, config.total_steps, host["loss"], timing)
        interval_start, interval_steps = time.time(), 0
      if config.ckpt_every and step % config.ckpt_every == 0:
        save(step)
      if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
        evaluate(step, final=False)
    if start < config.total_steps and checkpointer.latest_step() != config.total_steps:
      save(config.total_steps, force=True)
  finally:
    # Whatever stops the loop, checkpoints already started are completed, not lost.
    checkpointer.close()
  results = evaluate(config.total_steps, final=True) if config.evals else {}
  writer.close()
  final = {"step": config.total_steps, **(mapping.get_metrics(metrics) if metrics else {}),
           **results}
  if is_writer:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2)
  return final
