"""What a long run meets besides bugs, and what mmret does about it.

- ``WorkdirLock``: one run per workdir. ``workdir/mmret.lock`` holds the holder's host, pid and
  start time under an exclusive ``flock``; the kernel releases it when the holder dies, so a lock
  left by a killed run is stale and taken over (with a warning naming it). A workdir on an object
  store (``gs://...``) has no ``flock``: there the lock file only records the holder, and refuses
  a second run only when the holder is a live process on the same host (see ``WorkdirLock``).
- ``write_manifest`` / ``verify_manifest``: the sha256 of every file of a checkpoint, written once
  the checkpoint is complete and checked before it is restored.
- ``StopSignals``: SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the current
  step; ``should_stop(step)`` is the same on every process (see its docstring).
- ``check_config``: impossible values refused before any work, naming the field and what it accepts.
- ``is_url`` / ``absolute``: workdirs, checkpoints and datasets may be local paths or URLs
  (``gs://bucket/run``); files are touched through ``etils.epath``, and only local paths are made
  absolute.
"""

import datetime
import hashlib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
from typing import Optional

from absl import logging
from etils import epath

LOCK_FILE = "mmret.lock"
MANIFEST_FILE = "mmret_manifest.json"


# ----------------------------------------------------------------------------------------------
# Local paths and URLs.

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path) -> bool:
  """Whether ``path`` is a URL (``gs://bucket/run``, ``s3://...``) rather than a local path."""
  return bool(_URL.match(os.fspath(path)))


def absolute(path) -> str:
  """A local ``path`` made absolute; a URL unchanged (``os.path.abspath`` would turn
  ``gs://bucket/run`` into ``<cwd>/gs:/bucket/run``)."""
  return str(epath.Path(path)) if is_url(path) else os.path.abspath(os.fspath(path))


def sync(f, path):
  """fsync of a local file open for writing (``path``: its name); an object store commits a
  file when it is closed, and has no file descriptor."""
  if not is_url(path):
    os.fsync(f.fileno())


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


def _holder() -> dict:
  """This process, as a lock file records it."""
  return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "start_ticks": _process_start_ticks(os.getpid()),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": " ".join(sys.argv)[:500],
  }


class WorkdirLock:
  """An exclusive lock on ``workdir`` for the life of one run (``with WorkdirLock(dir): ...``).

  On a URL workdir (``gs://...``) there is no ``flock`` and no process to check on another host:
  the lock file records the holder (who runs there, for people and for the next launch), a second
  run is refused only when the recorded holder is a live process on this host, and otherwise a
  non-empty lock is taken over with a warning naming its holder. Keeping one run per object-store
  workdir across hosts is the launcher's job.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
    self._url = is_url(workdir)
    self._fd = None
    self._held = False

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

  def _read_url(self) -> dict:
    path = epath.Path(self.path)
    if not path.exists():
      return {}
    data = path.read_text()
    try:
      return json.loads(data) if data.strip() else {}
    except ValueError:
      return {"pid": "?", "host": "?", "command": f"unreadable lock file {data[:80]!r}"}

  def _acquire_url(self):
    previous = self._read_url()
    if previous and _is_alive_here(previous) and previous.get("pid") != os.getpid():
      raise WorkdirLockedError(self._in_use(previous))
    if previous:
      logging.warning(
          "Taking over the lock %s of %s: a lock on an object store cannot be held (no flock) "
          "and that process is not alive on this host",
          self.path,
          describe_holder(previous),
      )
    else:
      logging.info(
          "Workdir lock %s records this run only: on an object store it cannot keep out a run "
          "on another host",
          self.path,
      )
    path = epath.Path(self.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_holder()))
    self._held = True
    return self

  def acquire(self):
    if self._url:
      return self._acquire_url()
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
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_holder()).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def check_free(self):
    """Raises ``WorkdirLockedError`` now if a live run holds the lock (creates nothing): lets a
    second launch fail before the slow start-up. ``acquire`` is what guards the workdir."""
    if self._url:
      holder = self._read_url()
      if holder and _is_alive_here(holder) and holder.get("pid") != os.getpid():
        raise WorkdirLockedError(self._in_use(holder))
      return
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
    if self._held:
      epath.Path(self.path).write_text("")  # empty = free, as on a local workdir
      self._held = False
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


def size_and_sha256(path: str) -> tuple[int, str]:
  """Size in bytes and sha256 of file ``path`` (local or URL), in one read."""
  digest, size = hashlib.sha256(), 0
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
      size += len(block)
  return size, digest.hexdigest()


def _files(directory: str):
  """(path relative to ``directory``, path) of every file under ``directory`` (local or URL)."""
  top = epath.Path(directory)
  for root, _, names in top.walk():
    for name in names:
      path = root / name
      rel = os.fspath(path.relative_to(top))
      if rel != MANIFEST_FILE:
        yield rel, os.fspath(path)


def write_manifest(directory: str, **extra) -> str:
  """Writes ``directory/mmret_manifest.json``: size and sha256 of every file under it."""
  files = {}
  for rel, p in _files(directory):
    size, sha256 = size_and_sha256(p)
    files[rel] = {"size": size, "sha256": sha256}
  path = epath.Path(directory) / MANIFEST_FILE
  tmp = epath.Path(f"{path}.tmp")
  with tmp.open("w") as f:
    json.dump({"files": files, **extra}, f, indent=1, sort_keys=True)
    f.flush()
    sync(f, tmp)
  tmp.replace(path)
  return os.fspath(path)


def read_manifest(directory: str) -> Optional[dict]:
  path = epath.Path(directory) / MANIFEST_FILE
  if not path.exists():
    return None
  with path.open("r") as f:
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
      size, sha256 = size_and_sha256(path)
      if size != expected["size"]:
        return f"{rel} has {size} bytes, {expected['size']} were written"
      if sha256 != expected["sha256"]:
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
