"""The training loop: data -> state -> step -> log / evaluate / checkpoint, read top to bottom.

``run(config, workdir)`` is everything ``mmret.main`` does after parsing flags; tests call it
directly. Starting with a workdir that holds a checkpoint resumes from it. A recipe with
``config.stages`` (e.g. SOLAR's two stages) runs them in order, each in ``workdir/<stage>`` and
each starting from the previous stage's parameters; a resumed run continues in the right stage.

The workdir may be a local path or a URL (``gs://bucket/run``, as big_vision keeps runs): config,
metrics, reports, curves and checkpoints are written through ``etils.epath`` and Orbax, and a URL
is never made into a local path. See ``faults.WorkdirLock`` for the lock on such a workdir.
"""

import contextlib
import copy
import functools
import inspect
import json
import math
import os
import time
from typing import Optional

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mmret import checkpoint as ckpt_lib
from mmret import faults, feature_cache, gradcache, metrics_writer, ops, optim, registry, runtime
from mmret import lora as lora_lib
from mmret import step as step_lib
from mmret.data import pipeline, sources
from mmret import progress
from mmret.evals import report, runner
from mmret.models.retrieval import build_model

# Evaluation metrics worth a log line (the last component of their key).
HEADLINE_METRICS = ("rsum", "average", "mR", "precision", "avg", "hit@1")


class NonFiniteLossError(FloatingPointError):
  pass


def example_batch(input_cfg, batch_size: int = 1) -> dict:
  """Zeros shaped like a training batch (for initialisation and shape inference)."""
  size, length = input_cfg.image_size, input_cfg.max_text_len
  return {
      "image": np.zeros((batch_size, size, size, 3), np.float32),
      "text_ids": np.zeros((batch_size, length), np.int32),
      "text_mask": np.ones((batch_size, length), bool),
  }


def check_batch_size(config):
  for count, what in ((jax.device_count(), "devices"), (jax.process_count(), "processes")):
    if config.input.batch_size % count:
      raise ValueError(
          f"input.batch_size={config.input.batch_size} is not divisible by the " f"{count} {what}"
      )


def prepare_data(config):
  """Prepares missing embedded datasets once (process 0) before any process reads them."""
  datasets = {src["dataset"] for src in config.input.train}
  datasets |= {cfg.dataset for cfg in config.evals.values() if "dataset" in cfg}
  if jax.process_index() == 0:
    for dataset in sorted(datasets):
      sources.load_builder(dataset, config.input.data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mmret: datasets prepared")


def _hparams(cfg) -> dict:
  return {k: v for k, v in cfg.to_dict().items() if k != "name"}


def _check_hparams(fn, hparams: dict, where: str):
  """A misspelt hyper-parameter is an error naming it, before anything is compiled."""
  accepted = {
      name for name, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY
  }
  unknown = sorted(set(hparams) - accepted)
  if unknown:
    raise ValueError(
        f"{where}: unknown fields {unknown}; {fn.__qualname__} accepts "
        f"{sorted(accepted - {'axis_name'})}"
    )


def loss_function(config):
  """The loss of ``config``'s method with ``config.loss``'s hyper-parameters bound."""
  method = registry.method(config.method.name)
  name = config.loss.get("name")
  if method.loss is not None:
    if name:
      raise ValueError(
          f"method {config.method.name!r} trains with its own loss "
          f"({method.loss.__module__}.{method.loss.__name__}); remove "
          f"config.loss.name={name!r}"
      )
    fn = method.loss
  elif not name:
    raise ValueError(
        f"method {config.method.name!r} needs config.loss.name, one of "
        f"{sorted(registry.LOSSES)}"
    )
  else:
    fn = registry.loss(name)
  hparams = _hparams(config.loss)
  _check_hparams(fn, hparams, "config.loss")
  return functools.partial(fn, **hparams)


def _on_pixels(fn, normalize, position: int):
  """``fn`` whose batch (positional argument ``position``) has its pixels normalised first."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    args = list(args)
    args[position] = normalize(args[position])
    return fn(*args, **kwargs)

  return wrapped


class Setup:
  """Everything a config defines that is not state: model, optimizer, method, loss.

  With LoRA (``config.model.lora.rank`` > 0, see ``mmret.lora``) the trained parameters hold the
  factors in a top-level 'lora' subtree; the optimizer and frozen mask cover them, and
  ``forward``, ``predict`` and the method's ``init_frozen`` see the merged weights
  (``merge_lora``), which is what the model computes with.
  """

  def __init__(self, config, *, vocab_size: Optional[int] = None):
    """``vocab_size``: the text tower's vocabulary (default: the configured tokenizer's)."""
    if vocab_size is None:
      vocab_size = pipeline.tokenizer_for(config.input).vocab_size
    self.model = build_model(
        config.model, vocab_size=vocab_size, max_text_len=config.input.max_text_len
    )
    self.example = example_batch(config.input)
    # (rank, alpha, targets), or None when LoRA is off.
    self.lora = lora_lib.config_values(config.model.get("lora"))
    abstract_params = jax.eval_shape(lambda: self.initial_params(jax.random.PRNGKey(0), 0))
    if self.lora is not None:
      lora_lib.check_not_frozen(config.optim.freeze, abstract_params[lora_lib.LORA])
    self.tx, self.lr = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
    self.frozen_mask = optim.frozen_mask(config.optim, abstract_params)
    self.method = registry.method(config.method.name)
    method_hparams = _hparams(config.method)
    _check_hparams(self.method.make_forward, method_hparams, "config.method")
    # Batches carry uint8 pixels; the jitted step and embedding pass normalise them first.
    pixels = functools.partial(
        ops.with_normalized_pixels, mean=tuple(config.input.mean), std=tuple(config.input.std)
    )
    self.forward = _on_pixels(self.method.make_forward(self.model, **method_hparams), pixels, 2)
    self.predict = _on_pixels(self.method.make_predict(self.model, **method_hparams), pixels, 1)
    if self.lora is not None:
      self.forward = self._on_merged(self.forward, self.merge_lora)
      self.predict = self._on_merged(self.predict, self.merge_lora)
    self.method_hparams = method_hparams
    self.loss_fn = loss_function(config)
    self.microbatches = gradcache.check(
        config.optim.get("microbatches", 1), self.method, config.method.name
    )

  # Folded into the seed's key for the LoRA factors (the model's init uses the seed's key itself).
  _LORA_KEY = 0x10A

  @staticmethod
  def _on_merged(fn, merge):
    """``fn(params, ...)`` that receives ``merge(params)``."""

    @functools.wraps(fn)
    def wrapped(params, *args, **kwargs):
      return fn(merge(params), *args, **kwargs)

    return wrapped

  def merge_lora(self, params):
    """``params`` as the model computes with them: LoRA factors merged into their kernels and
    the 'lora' subtree removed (parameters without one are returned as they are)."""
    if self.lora is None:
      return lora_lib.merged(params, alpha=0.0, rank=0)  # an error if factors are present
    rank, alpha, _ = self.lora
    return lora_lib.merged(params, alpha=alpha, rank=rank)

  def _add_lora(self, params, seed: int):
    """``params`` with fresh LoRA factors (B = 0: the merged weights are ``params``)."""
    if self.lora is None:
      return params
    rank, _, targets = self.lora
    key = jax.random.fold_in(jax.random.PRNGKey(seed), self._LORA_KEY)
    return dict(params, **{lora_lib.LORA: lora_lib.init(params, key, rank=rank, targets=targets)})

  def initial_params(self, key, seed: int):
    """Random model parameters from ``key``, with fresh LoRA factors from ``seed``."""
    return self._add_lora(self.model.init(key, self.example)["params"], seed)

  def step_body(self):
    """The per-device train step of this config (``step.train_step`` with its pieces bound)."""
    return functools.partial(
        step_lib.train_step,
        forward=self.forward,
        loss_fn=self.loss_fn,
        tx=self.tx,
        lr_schedule=self.lr,
        frozen_mask=self.frozen_mask,
        microbatches=self.microbatches,
    )

  def init_state(self, config, mapping, params=None):
    """Fresh canonical state: initial, pretrained (``model.init``) or given ``params``.

    Given ``params`` are merged weights (e.g. an earlier stage's, from ``load_params``); with
    LoRA on, fresh factors (B = 0) are added to them, to pretrained or to random weights.
    """
    if params is not None and lora_lib.LORA in params:
      raise ValueError(
          f"Setup.init_state: the given parameters hold LoRA factors ('{lora_lib.LORA}/...'); "
          "pass merged weights (load_params returns them merged)"
      )
    if params is None and (config.model.get("init") or self.lora is not None):
      params = jax.jit(lambda k: self.model.init(k, self.example)["params"])(
          jax.random.PRNGKey(config.seed)
      )
      if config.model.get("init"):
        from mmret.models import pretrained  # only runs that start from checkpoints need it

        params = pretrained.load_into(params, config.model.init)
    if params is not None:
      params = self._add_lora(params, config.seed)
    state = step_lib.init_state(
        self.model, self.example, self.tx, seed=config.seed, mapping=mapping, params=params
    )
    frozen = self.method.init_frozen(
        self.model, self.merge_lora(state.params), **self.method_hparams
    )
    return state.replace(frozen=jax.device_put(frozen, mapping.replicated))

  def abstract_state(self, mapping):
    """Shapes, dtypes and (replicated) shardings of the state, for restoring checkpoints."""

    def init():
      params = None
      if self.lora is not None:
        params = self.initial_params(jax.random.PRNGKey(0), 0)
      state = step_lib.init_state(
          self.model, self.example, self.tx, seed=0, mapping=mapping, params=params
      )
      return state.replace(
          frozen=self.method.init_frozen(
              self.model, self.merge_lora(state.params), **self.method_hparams
          )
      )

    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mapping.replicated),
        jax.eval_shape(init),
    )


def load_params(config, workdir: str):
  """Parameters of the latest checkpoint in ``workdir`` (a finished run of ``config``), merged:
  LoRA factors, if any, folded into their kernels (the weights the model computes with, which
  the next stage starts from and ``Setup.predict`` takes)."""
  setup = Setup(config)
  abstract = setup.abstract_state(step_lib.DeviceMapping(config.mapping))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(os.fspath(workdir), "checkpoints"))
  try:
    params = checkpointer.restore(abstract).params
  finally:
    checkpointer.close()
  return setup.merge_lora(params)


class _LossWatch:
  """Collects per-step losses on device; raises on the first non-finite one when checked."""

  def __init__(self):
    self.pending = []

  def add(self, step: int, loss):
    self.pending.append((step, loss))

  def check(self, last_good_checkpoint):
    """``last_good_checkpoint``: a function giving the newest checkpoint that verifies."""
    values = jax.device_get([loss for _, loss in self.pending])
    for (step, _), value in zip(self.pending, values):
      value = float(np.asarray(value).reshape(-1)[0])
      if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value} at step {step}; stopping. Last good checkpoint: "
            f"{last_good_checkpoint() or 'none (no checkpoint saved yet)'}"
        )
    self.pending = []


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _evals_with_defaults(config):
  """config.evals with each evaluation's ``every`` defaulting to ``config.eval_every``."""
  evals = config.evals.to_dict()
  for cfg in evals.values():
    cfg.setdefault("every", config.eval_every)
  return evals


def train_stage(
    config, workdir: str, *, init_params=None, run_final_evals: bool = True, stop_signals=None
):
  """Trains one stage of ``config`` in ``workdir``; returns the final metrics.

  ``stop_signals`` (a ``faults.StopSignals``): when it asks to stop, the current step is finished,
  checkpointed (state and data position, waiting for the save) and ``faults.Stopped`` is raised.
  """
  faults.check_config(config)
  check_batch_size(config)
  workdir = os.fspath(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  is_writer = jax.process_index() == 0
  if is_writer:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  setup = Setup(config)
  mapping = step_lib.DeviceMapping(config.mapping)
  # On CPU, collectives of steps dispatched back to back can deadlock XLA's rendezvous:
  # keep at most one step in flight there.
  block_every_step = jax.devices()[0].platform == "cpu" and jax.device_count() > 1

  data_iter = pipeline.make_train_iterator(
      config.input,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_ckpts
  )
  # The newest checkpoint that verifies; corrupt newer ones are moved aside with a warning.
  last_ckpt, state = checkpointer.restore_latest_good(setup.abstract_state(mapping), data_iter)
  if last_ckpt is not None:
    logging.info("Resumed from %s at step %d", checkpointer.directory, last_ckpt)
  else:
    state = setup.init_state(config, mapping, init_params)
  start = int(jax.device_get(state.step))
  # Frozen towers: their outputs are computed once per record and batches carry them instead of
  # images; evaluations embed from cached outputs too (mmret/feature_cache.py).
  eval_batches_fn = None
  if feature_cache.enabled(config, setup.frozen_mask):
    towers = feature_cache.TowerPass(setup.model, state.params, config.input)
    position = data_iter.get_state()
    data_iter = pipeline.make_train_iterator(
        config.input,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        features=feature_cache.for_training(config, towers),
    )
    data_iter.set_state(position)
    eval_batches_fn = feature_cache.EvalBatches(towers, config.input)

  # The next batch is copied to the devices while the current step runs (checkpoints keep the
  # position of the batches trained on, not of those read ahead).
  data_iter = mapping.prefetch(data_iter, depth=2)
  train_fn = mapping.compile(setup.step_body())
  native_state = mapping.put_state(state)
  del state
  evals_cfg = _evals_with_defaults(config)
  writer = metrics_writer.MetricWriter(workdir, enabled=is_writer)
  # Lines of steps after the checkpoint are rewritten by this run (and the final evaluations of a
  # finished run are run again): each step stays once in metrics.jsonl.
  writer.rewind(start, drop_evals_at_step=start == config.total_steps and run_final_evals)
  watch = _LossWatch()
  last_good = checkpointer.last_good

  def save(step, *, force=False, wait=False):
    watch.check(last_good)  # never checkpoint past a non-finite loss
    checkpointer.save(step, mapping.get_state(native_state), data_iter, force=force, wait=wait)

  def evaluate(step, *, final):
    if not evals_cfg:
      return {}
    if not final and not any(
        runner.is_due(c["every"], step, final=False) for c in evals_cfg.values()
    ):
      return {}
    params = mapping.get_state(native_state).params
    results = runner.run_evals(
        setup.predict,
        evals_cfg,
        config.input,
        step,
        workdir,
        evaluators=registry.evaluator,
        params=params,
        final=final,
        data_dir=config.input.data_dir,
        batches_fn=eval_batches_fn,
    )
    writer.write(step, results)
    for name in evals_cfg:
      # Headline figures only; every metric is in metrics.jsonl and eval/<name>.md.
      headline = {
          k.split("/", 2)[2]: v
          for k, v in results.items()
          if k.startswith(f"eval/{name}/") and k.rsplit("/", 1)[1] in HEADLINE_METRICS
      }
      if headline:
        logging.info(
            "step %d | eval %s | %s",
            step,
            name,
            " | ".join(f"{k} {v:.2f}" for k, v in sorted(headline.items())),
        )
    return results

  examples_per_step = config.input.batch_size
  interval_start, interval_steps, metrics = time.time(), 0, None
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = next(data_iter)
      if step == start + 1:  # logged before the silent compile of the first step
        compiling = progress.Progress("compiling the train step (the first step)")
        cache_before = runtime.compilation_cache_events()
      native_state, metrics = train_fn(native_state, batch)
      watch.add(step, metrics["loss"])
      if block_every_step:
        jax.block_until_ready(metrics)
      interval_steps += 1
      if step == start + 1:  # the first step compiles: keep it out of the throughput figure
        jax.block_until_ready(metrics)
        loaded = runtime.compilation_cache_events()["hits"] > cache_before["hits"]
        compiling.finish(
            f"{'loaded the train step from the compilation cache' if loaded else 'compiled the train step'}"
            f" and ran step {step}"
        )
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
      checkpointer.poll()
      if stop_signals is not None and stop_signals.should_stop(step):
        if not (config.ckpt_every and step % config.ckpt_every == 0):
          save(step, force=True)
        checkpointer.wait()  # the checkpoint is complete and sealed before the process exits
        checkpointer.close()
        writer.close()
        raise faults.Stopped(
            step,
            stop_signals.received,
            checkpointer.step_dir(step),
            stop_signals.exit_code,
        )
      if step != config.total_steps:
        evaluate(step, final=False)
    if start < config.total_steps and checkpointer.latest_step() != config.total_steps:
      save(config.total_steps, force=True)
  finally:
    # Whatever stops the loop, checkpoints already started are completed, not lost.
    checkpointer.close()
  results = evaluate(config.total_steps, final=True) if run_final_evals else {}
  writer.close()
  final = {
      "step": config.total_steps,
      **(mapping.get_metrics(metrics) if metrics else {}),
      **results,
  }
  if is_writer:
    with (epath.Path(workdir) / "final_metrics.json").open("w") as f:
      json.dump(final, f, indent=2)
    report.write_training_curves(workdir, HEADLINE_METRICS, errors="log")  # <workdir>/curves.png
  return final


# Config groups a stage may extend with new fields (hyper-parameters and evaluations).
_OPEN_GROUPS = ("loss", "method", "evals")


def _merge(base, overrides, path=""):
  """Recursively applies ``overrides`` to ConfigDict ``base``; unknown keys are errors."""
  for key, value in overrides.items():
    where = f"{path}{key}"
    if key not in base:
      if not any(where.startswith(g + ".") for g in _OPEN_GROUPS):
        raise KeyError(f"stage override {where!r} is not a config field")
      base[key] = value
    elif hasattr(value, "items") and hasattr(base[key], "items"):
      _merge(base[key], value, where + ".")
    else:
      base[key] = value


def stage_configs(config):
  """[(stage name, full config of that stage)] from ``config.stages``, or [(None, config)]."""
  if not config.get("stages"):
    return [(None, config)]
  base = copy.deepcopy(config)
  with base.unlocked():
    del base["stages"]
  stages = []
  for name, overrides in config.stages.items():
    stage = copy.deepcopy(base)
    with stage.unlocked():
      _merge(stage, overrides)
    stages.append((name, stage))
  return stages


def stage_dir(workdir: str, stage_name) -> str:
  """Where a stage runs: ``workdir/<stage>``, or ``workdir`` itself for a one-stage recipe."""
  return os.path.join(os.fspath(workdir), stage_name) if stage_name else workdir


def last_stage(config, workdir: str):
  """(config, run directory) of ``config``'s last stage: where its final parameters live."""
  name, stage = stage_configs(config)[-1]
  return stage, stage_dir(workdir, name)


def run(config, workdir: str, *, handle_signals: bool = True):
  """Trains ``config`` (all its stages) in ``workdir``; returns the last stage's final metrics.

  Every value is checked first (``faults.check_config``); then the workdir is locked for this run
  (``faults.WorkdirLock``: a second run on it fails at once, naming the holder). With
  ``handle_signals``, SIGTERM / SIGINT stop the run after the current step with a checkpoint and
  raise ``faults.Stopped`` (``mmret.main`` exits 0, or 130 after SIGINT).
  """
  stages = stage_configs(config)
  for _, stage in stages:
    faults.check_config(stage)
  lock = _lock_workdir(workdir)
  try:
    signals = faults.StopSignals() if handle_signals else None
    with signals or contextlib.nullcontext():
      return _run_stages(config, workdir, stages, signals)
  finally:
    if lock is not None:
      lock.release()


def _lock_workdir(workdir: str):
  """Process 0 locks ``workdir``; every process fails when it cannot."""
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = faults.WorkdirLock(workdir).acquire()
    except faults.WorkdirLockedError as e:
      error = str(e)
  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.int32(bool(error)))
    if np.any(failed) and not error:
      error = f"workdir {workdir} is in use by another run (see process 0's log)"
  if error:
    if lock is not None:
      lock.release()
    raise faults.WorkdirLockedError(error)
  return lock


def _run_stages(config, workdir, stages, signals):
  prepare_data(config)
  if stages[0][0] is None:
    return train_stage(config, workdir, stop_signals=signals)
  previous, final = None, {}
  for i, (name, stage) in enumerate(stages):
    run_dir = stage_dir(workdir, name)
    last = i == len(stages) - 1
    if not last and _finished(stage, run_dir):
      logging.info("Stage %s already finished in %s", name, run_dir)
      previous = (stage, run_dir)
      continue
    init_params = load_params(*previous) if previous else None
    logging.info("Stage %s (%d steps) in %s", name, stage.total_steps, run_dir)
    final = train_stage(stage, run_dir, init_params=init_params, stop_signals=signals)
    previous = (stage, run_dir)
  return final


def _finished(config, workdir: str) -> bool:
  path = os.path.join(os.fspath(workdir), "checkpoints")
  if not epath.Path(path).is_dir():
    return False
  checkpointer = ckpt_lib.Checkpointer(path)
  try:
    return checkpointer.latest_step() == config.total_steps
  finally:
    checkpointer.close()
