"""Checkpoints: the train state and the data iterator's position, saved together by Orbax.

Each save is one Orbax step directory written to a temporary name and renamed when complete,
so an interrupted save never looks finished. Once complete, the save is *sealed*: process 0 writes
``mmret_manifest.json`` (size and sha256 of every file, see ``mmret.faults``) into it.
``restore`` checks the manifest before reading and puts the data iterator back where it was, which
makes a resumed run bit-identical to an uninterrupted one. ``restore_latest_good`` (what training
uses) also treats a state holding NaN/inf as corrupt, and moves a corrupt checkpoint aside to
``corrupt-<step>`` (never deleting it) to fall back to the previous one.

The directory is a local path (made absolute) or a URL (``gs://bucket/run/checkpoints``), given to
Orbax unchanged; every other file of a checkpoint (manifest, data positions, moving aside) is
touched through ``etils.epath``.

The data iterator's position is a batch index, the same on every process (each process reads its
strided share of one global stream): a checkpoint saved by N processes resumes on M processes with
the same global batch, continuing the same examples.
"""

import json
import logging as std_logging
import os
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mmret import faults


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be used (failed checksums, truncated, non-finite...)."""


def _is_finite(state) -> bool:
  leaves = [
      x
      for x in jax.tree.leaves(state)
      if hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)
  ]
  if not leaves:
    return True
  check = jax.jit(
      lambda xs: jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in xs]))
  )
  return bool(np.asarray(jax.device_get(check(leaves))))


# Replicated arrays are written cooperatively by their replicas (Orbax's replica-parallel save)
# only when each replica's slice is at least this large: every slice of a smaller array costs a
# compiled slicing program per leaf shape (seconds per save on a small model) for no gain in write
# speed.
MIN_REPLICA_SLICE_BYTES = 4 << 20


def _register_array_handler():
  default = ocp.type_handlers.get_type_handler(jax.Array)
  handler = ocp.type_handlers.ArrayHandler(
      # Orbax's default handler keeps array metadata in this store; so does this one.
      array_metadata_store=getattr(default, "_array_metadata_store", None),
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
  )
  absl_logger = std_logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)  # Orbax warns about every override
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()

_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    # Local paths are made absolute; a URL (gs://...) goes to Orbax as it is.
    self.directory = faults.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._unsealed = []  # steps saved whose manifest is not written yet
    self._closed = False

  def step_dir(self, step: int) -> str:
    return os.fspath(epath.Path(self.directory) / str(step))

  def latest_step(self):
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  # -- saving -----------------------------------------------------------------------------------

  def save(
      self, step: int, state, data_iterator=None, *, force: bool = False, wait: bool = False
  ) -> bool:
    """Saves ``state`` (canonical layout) and the iterator's position as checkpoint ``step``.

    Asynchronous unless ``wait``; errors of an asynchronous save (e.g. a full disk) are raised by
    the next ``poll``/``save``/``close``, naming the checkpoint.
    """
    self._seal()
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    except OSError as e:
      raise CheckpointError(f"saving checkpoint {self.step_dir(step)} failed: {e}") from e
    if saved:
      self._unsealed.append(int(step))
      if wait:
        self._seal()
    return saved

  def poll(self):
    """Seals finished asynchronous saves (cheap; called once per training step)."""
    if self._unsealed and not self._manager.is_saving_in_progress():
      self._seal()

  def _seal(self):
    """Waits for pending saves, then writes the manifest of each (process 0)."""
    if not self._unsealed:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      steps, self._unsealed = self._unsealed, []
      raise CheckpointError(
          f"saving checkpoint {' / '.join(self.step_dir(s) for s in steps)} failed: "
          f"{type(e).__name__}: {e}"
      ) from e
    steps, self._unsealed = self._unsealed, []
    if jax.process_index() != 0:
      return
    for step in steps:
      if epath.Path(self.step_dir(step)).is_dir():  # not removed meanwhile by max_to_keep
        try:
          faults.write_manifest(self.step_dir(step), step=step, process_count=jax.process_count())
        except OSError as e:
          raise CheckpointError(
              f"writing the manifest of checkpoint {self.step_dir(step)} failed: {e}"
          ) from e

  # -- verifying and restoring ------------------------------------------------------------------

  def verify(self, step: int):
    """None if checkpoint ``step`` matches its manifest (or predates manifests), else the problem."""
    problem = faults.verify_manifest(self.step_dir(step))
    if problem and problem.endswith(f"has no {faults.MANIFEST_FILE}"):
      logging.warning(
          "Checkpoint %s has no checksum manifest (saved by an older mmret, or stopped before the "
          "manifest was written): restoring it unverified",
          self.step_dir(step),
      )
      return None
    return problem

  def last_good(self):
    """Path of the newest checkpoint that verifies (after pending saves finish), or None."""
    self._seal()
    for step in reversed(self.all_steps()):
      if self.verify(step) is None:
        return self.step_dir(step)
    return None

  def _restore_data(self, step: int, data_iterator):
    """Sets ``data_iterator`` to checkpoint ``step``'s position, whatever process count saved it."""
    data_dir = epath.Path(self.step_dir(step)) / "data"
    here = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if here.exists():
      data_iterator.set_state(json.loads(here.read_text()))
      return
    states, counts = [], set()
    for path in sorted(data_dir.glob("process_*-of-*.json"), key=os.fspath):
      counts.add(int(_DATA_FILE.search(os.fspath(path)).group(2)))
      states.append(json.loads(path.read_text()))
    if not states:
      raise CheckpointError(f"checkpoint {self.step_dir(step)} holds no data iterator position")
    saved_count = max(counts)
    # A plain batch index means the same global position on any process count.
    portable = (
        all(set(s) == {"next_index"} for s in states) and len({json.dumps(s) for s in states}) == 1
    )
    if not portable:
      raise CheckpointError(
          f"checkpoint {self.step_dir(step)} was saved by {saved_count} processes, this run has "
          f"{jax.process_count()}, and its data iterator positions ({states[0]}) cannot be "
          f"carried over (e.g. input.worker_count > 0). Relaunch with {saved_count} processes, "
          "or set input.worker_count=0 for the run that saves"
      )
    logging.warning(
        "Checkpoint %s was saved by %d processes, this run has %d: the data stream continues at "
        "batch %d (same global batch, same examples)",
        self.step_dir(step),
        saved_count,
        jax.process_count(),
        states[0]["next_index"],
    )
    data_iterator.set_state(states[0])

  def _restore_unchecked(self, step, abstract_state, data_iterator):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      if data_iterator is not None:
        self._restore_data(step, data_iterator)
    except CheckpointError:
      raise
    except Exception as e:  # Orbax/TensorStore raise many types for unreadable files.
      raise CheckpointError(
          f"checkpoint {self.step_dir(step)} cannot be restored ({type(e).__name__}: {e})"
      ) from e
    return restored["state"]

  def restore(self, abstract_state, data_iterator=None, *, step=None):
    """Restores the state (shaped and sharded like ``abstract_state``) and the iterator.

    Raises ``CheckpointError`` if the checkpoint fails its checksums or cannot be read.
    """
    self._seal()
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    problem = self.verify(step)
    if problem:
      raise CheckpointError(f"checkpoint {self.step_dir(step)} is corrupt: {problem}")
    try:
      return self._restore_unchecked(step, abstract_state, data_iterator)
    except CheckpointError as e:
      raise CheckpointError(
          f"{e}. It may be truncated or from a different model/config; move it aside to resume "
          f"from an earlier one (complete steps here: {self.all_steps()})"
      ) from e

  def restore_latest_good(self, abstract_state, data_iterator=None):
    """(step, state) of the newest checkpoint that verifies, restores and is finite; (None, None)
    when there is none. Each newer one failing is named in a warning and moved aside."""
    self._seal()
    steps = self.all_steps()
    moved = []
    for step in reversed(steps):
      problem = self.verify(step)
      state = None
      if problem is None:
        try:
          state = self._restore_unchecked(step, abstract_state, data_iterator)
        except CheckpointError as e:
          if "processes, this run has" in str(e):
            raise  # a usable checkpoint this run cannot continue: not corrupt
          problem = str(e.__cause__ or e)
      if problem is None and not _is_finite(state):
        problem = "its state holds NaN or infinite values"
      if problem is None:
        return step, state
      moved.append(self._move_aside(step, problem))
    if moved:
      raise CheckpointError(
          f"no checkpoint in {self.directory} is usable; each was moved aside ({', '.join(moved)}). "
          "Relaunch to start from scratch, or restore one of them by hand"
      )
    return None, None

  def _move_aside(self, step: int, problem: str) -> str:
    """Renames corrupt checkpoint ``step`` to ``corrupt-<step>`` (process 0; never deleted)."""
    source = self.step_dir(step)
    target = os.fspath(epath.Path(self.directory) / f"corrupt-{step}")
    suffix = 1
    while epath.Path(target).exists():
      target = os.fspath(epath.Path(self.directory) / f"corrupt-{step}.{suffix}")
      suffix += 1
    logging.warning(
        "Checkpoint %s is corrupt (%s): moved aside to %s; falling back to the previous one",
        source,
        problem,
        target,
    )
    if jax.process_index() == 0:
      epath.Path(source).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"mmret: checkpoint {step} moved aside")
    self._manager.reload()
    return target

  def wait(self):
    """Blocks until pending asynchronous saves are complete (and sealed)."""
    self._seal()

  def close(self):
    if self._closed:
      return
    self._closed = True
    try:
      self._seal()
    finally:
      self._manager.wait_until_finished()
      self._manager.close()
