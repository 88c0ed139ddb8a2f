"""Checkpoints: the train state and the data iterator's position, saved together by Orbax.

Each save is one Orbax step directory written to a temporary name and renamed when complete,
so an interrupted save never looks finished. ``restore`` puts the data iterator back where it
was, which makes a resumed run bit-identical to an uninterrupted one.
"""

import os

import grain
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be read (e.g. truncated files)."""


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Saves ``state`` (canonical layout) and the iterator's position as checkpoint ``step``."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iterator=None, *, step=None):
    """Restores the state (shaped and sharded like ``abstract_state``) and the iterator."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    path = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax/TensorStore raise many types for unreadable files.
      raise CheckpointError(
          f"checkpoint {path} cannot be restored ({type(e).__name__}: {e}). It may be truncated "
          f"or from a different model/config; move it aside to resume from an earlier one "
          f"(complete steps here: {self.all_steps()})"
      ) from e
    return restored["state"]

  def wait(self):
    """Blocks until pending asynchronous saves are complete."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
