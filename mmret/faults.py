"""What a long run meets besides bugs, and what mmret does about it.

- ``WorkdirLock``: one run per workdir. ``workdir/mmret.lock`` holds the holder's host, pid and
  start time under an exclusive ``flock``; the kernel releases it when the holder dies, so a lock
  left by a killed run is stale and taken over (with a warning naming it).
- ``write_manifest`` / ``verify_manifest``: the sha256 of every file of a checkpoint, written once
  the checkpoint is complete and checked before it is restored.
- ``StopSignals``: SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the current
  step; ``should_stop(step)`` is the same on every process (see its docstring).
- ``check_config``: impossible values refused before any work, naming the field and what it accepts.
"""

import datetime
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
from typing import Optional

from absl import logging

LOCK_FILE = "mmret.lock"
MANIFEST_FILE = "mmret_manifest.json"


# ----------------------------------------------------------------------------------------------
# One run per workdir.


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _process_start_ticks(pid: int) -> Optional[str]:
  """The start time of process ``pid`` in clock ticks since boot (Linux), None if unknown/dead."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _is_alive_here(holder: dict) -> bool:
  """Whether ``holder`` (a lock's content) names a live process on this host."""
  pid = holder.get("pid")
  if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # alive, another user's
  ticks = _process_start_ticks(pid)
  # A recycled pid belongs to a process started at another time.
  return ticks is None or holder.get("start_ticks") in (None, ticks)


def describe_holder(holder: dict) -> str:
  return (
      f"pid {holder.get('pid')} on host {holder.get('host')} "
      f"(started {holder.get('started', '?')}: {holder.get('command', '?')})"
  )


class WorkdirLock:
  """An exclusive lock on ``workdir`` for the life of one run (``with WorkdirLock(dir): ...``)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def _in_use(self, holder: dict) -> str:
    return (
        f"workdir {os.path.dirname(self.path)} is in use by another run: "
        f"{describe_holder(holder)}; lock file {self.path}. Wait for that run to end or stop it, "
        "or use another --workdir."
    )

  def _read(self, fd) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
    try:
      return json.loads(data) if data.strip() else {}
    except ValueError:
      return {"pid": "?", "host": "?", "command": f"unreadable lock file {data[:80]!r}"}

  def acquire(self):
    import fcntl  # POSIX only; imported here so that the module imports anywhere

    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = self._read(fd)
      os.close(fd)
      raise WorkdirLockedError(self._in_use(holder)) from None
    previous = self._read(fd)
    if previous and _is_alive_here(previous) and previous.get("pid") != os.getpid():
      # flock is not honoured here (some network filesystems) but the holder is alive.
      os.close(fd)
      raise WorkdirLockedError(self._in_use(previous))
    if previous:
      logging.warning(
          "Taking over the stale lock %s of %s (that process is gone)",
          self.path,
          describe_holder(previous),
      )
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_ticks": _process_start_ticks(os.getpid()),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def check_free(self):
    """Raises ``WorkdirLockedError`` now if a live run holds the lock (creates nothing): lets a
    second launch fail before the slow start-up. ``acquire`` is what guards the workdir."""
    import fcntl

    try:
      fd = os.open(self.path, os.O_RDWR)
    except FileNotFoundError:
      return
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise WorkdirLockedError(self._in_use(self._read(fd))) from None
    finally:
      os.close(fd)  # releases the flock if taken

  def release(self):
    if self._fd is None:
      return
    # The file stays (empty = free): unlinking it would let two later runs lock two inodes.
    os.ftruncate(self._fd, 0)
    os.close(self._fd)  # closing releases the flock
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ----------------------------------------------------------------------------------------------
# Checkpoint manifests.


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(directory: str):
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel != MANIFEST_FILE:
        yield rel, path


def write_manifest(directory: str, **extra) -> str:
  """Writes ``directory/mmret_manifest.json``: size and sha256 of every file under it."""
  files = {rel: {"size": os.path.getsize(p), "sha256": _sha256(p)} for rel, p in _files(directory)}
  path = os.path.join(directory, MANIFEST_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"files": files, **extra}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def read_manifest(directory: str) -> Optional[dict]:
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def verify_manifest(directory: str) -> Optional[str]:
  """None if every file of ``directory`` matches its manifest, else what is wrong.

  A directory without a manifest (saved by an older mmret, or killed between the save and its
  manifest) is not verified here: the caller decides (see ``Checkpointer``).
  """
  try:
    manifest = read_manifest(directory)
  except (OSError, ValueError) as e:
    return f"its manifest {MANIFEST_FILE} is unreadable ({e})"
  if manifest is None:
    return f"it has no {MANIFEST_FILE}"
  on_disk = dict(_files(directory))
  for rel, expected in sorted(manifest["files"].items()):
    path = on_disk.pop(rel, None)
    if path is None:
      return f"{rel} is missing"
    try:
      size = os.path.getsize(path)
      if size != expected["size"]:
        return f"{rel} has {size} bytes, {expected['size']} were written"
      if _sha256(path) != expected["sha256"]:
        return f"{rel} does not match its sha256 checksum"
    except OSError as e:
      return f"{rel} cannot be read ({e})"
  return None


# ----------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT.


class StopSignals:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  One process: the handlers set a flag. Several processes (``jax.distributed``): JAX's
  preemption service owns SIGTERM (it tells every process), and ``should_stop(step)`` is
  ``multihost_utils.reached_preemption_sync_point(step)``, true on every process at the same
  step; SIGINT is forwarded to it as a SIGTERM. A second signal of the same kind stops at once.
  """

  def __init__(self):
    import jax

    self.received = None  # the first signal's number
    self._distributed = jax.process_count() > 1
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if self.received is not None and signum == self.received:
      # Asked twice: the default action (terminate / KeyboardInterrupt) now.
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      os.kill(os.getpid(), signum)
      return
    self.received = signum
    logging.warning(
        "Received %s: stopping after the current step with a checkpoint "
        "(send it again to stop at once)",
        signal.Signals(signum).name,
    )
    if self._distributed and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service tells the other processes

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      wanted = [signal.SIGINT] + ([] if self._distributed else [signal.SIGTERM])
      for signum in wanted:
        self._previous[signum] = signal.signal(signum, self._handler)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after ``step``: the same answer on every process."""
    if self._distributed:
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        if self.received is None:
          self.received = signal.SIGTERM
        return True
      return False
    return self.received is not None

  @property
  def exit_code(self) -> int:
    """0 after SIGTERM (a preemption is a clean stop), 130 after SIGINT (shell convention)."""
    return 130 if self.received == signal.SIGINT else 0


class Stopped(Exception):
  """Raised by ``train.run`` after a signal-requested stop, once the checkpoint is saved."""

  def __init__(self, step: int, signum: Optional[int], checkpoint: str, exit_code: int):
    name = signal.Signals(signum).name if signum else "a stop request"
    super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint}")
    self.step, self.signum, self.checkpoint, self.exit_code = step, signum, checkpoint, exit_code


# ----------------------------------------------------------------------------------------------
# Values.


class ConfigError(ValueError):
  """A config value no run can use."""


def _number(config, path: str):
  node = config
  for part in path.split("."):
    if node is None or part not in node:
      return None
    node = node[part]
  return node


def _require(config, path: str, ok, allowed: str, errors: list, *, optional=False):
  value = _number(config, path)
  if value is None and optional:
    return
  kind_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not kind_ok or not (math.isfinite(value) and ok(value)):
    errors.append(f"config.{path}={value!r}: must be {allowed}")


def check_config(config):
  """Raises ``ConfigError`` listing every impossible value of ``config`` (before any work)."""
  errors = []
  positive_int = lambda v: v == int(v) and v > 0  # noqa: E731
  non_negative_int = lambda v: v == int(v) and v >= 0  # noqa: E731
  _require(config, "total_steps", positive_int, "an integer >= 1", errors)
  _require(config, "log_every", positive_int, "an integer >= 1", errors)
  at_end = "an integer >= 0 (0: only at the end)"
  _require(config, "eval_every", non_negative_int, at_end, errors, optional=True)
  _require(
      config,
      "ckpt_every",
      non_negative_int,
      "an integer >= 0 (0: only the final checkpoint)",
      errors,
  )
  _require(config, "keep_ckpts", positive_int, "an integer >= 1", errors, optional=True)
  _require(config, "input.batch_size", positive_int, "an integer >= 1", errors)
  _require(config, "input.image_size", positive_int, "an integer >= 1", errors, optional=True)
  _require(config, "input.max_text_len", positive_int, "an integer >= 2", errors, optional=True)
  _require(config, "optim.lr", lambda v: v > 0, "a finite number > 0", errors)
  _require(config, "optim.warmup_steps", non_negative_int, "an integer >= 0", errors, optional=True)
  if "mapping" in config and config.mapping not in ("pmap", "shard_map"):
    errors.append(f"config.mapping={config.mapping!r}: must be one of 'pmap', 'shard_map'")
  for name, cfg in (config.get("evals") or {}).items():
    if "every" in cfg:
      _require(config, f"evals.{name}.every", non_negative_int, at_end, errors)
    if "batch_size" in cfg:
      _require(config, f"evals.{name}.batch_size", positive_int, "an integer >= 1", errors)
  if errors:
    raise ConfigError("impossible config values:\n  " + "\n  ".join(errors))
