"""Metrics to the workdir: JSON lines (``metrics.jsonl``) and TensorBoard event files.

The event files are written directly (TFRecord framing around ``Event`` protos holding scalar
summaries), so TensorBoard reads them without TensorFlow being installed here.

The workdir may be a URL (``gs://bucket/run``): files go through ``etils.epath``. An object store
has no appends, so there each write rewrites the whole file (``metrics.jsonl`` read back and
written with its new line; the event file from what this writer wrote), and nothing is fsync'ed
(an object is committed when it is closed).
"""

import contextlib
import errno
import json
import os
import socket
import struct
import time

from etils import epath

from mmret import faults

METRICS_FILE = "metrics.jsonl"


def _crc32c_table():
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    bits, n = n & 0x7F, n >> 7
    out.append(bits | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars=None, file_version=None) -> bytes:
  """A serialised ``tensorflow.Event`` with a scalar ``Summary`` (or a file_version header)."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field_bytes(
            1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value))
        )
        for tag, value in scalars.items()
    )
    out += _field_bytes(5, values)
  return out


def tfrecord(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (
      header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))
  )


def read_tfrecords(path: str):
  """Yields the payloads of a TFRecord file, checking both CRCs (used by tests and tools)."""
  with epath.Path(path).open("rb") as f:
    while header := f.read(8):
      if struct.unpack("<I", f.read(4))[0] != _masked_crc(header):
        raise ValueError(f"{path}: corrupt record header")
      data = f.read(struct.unpack("<Q", header)[0])
      if struct.unpack("<I", f.read(4))[0] != _masked_crc(data):
        raise ValueError(f"{path}: corrupt record payload")
      yield data


class MetricWriter:
  """Appends scalar metrics to ``workdir/metrics.jsonl`` and a TensorBoard event file.

  Only the process with ``enabled=True`` (process 0) writes. Appending keeps the history of an
  earlier, interrupted run in the same workdir; ``rewind`` drops what the resumed run redoes. Each
  line is flushed and fsync'ed, so a full disk is reported at the write that fails, naming the file.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self._url = faults.is_url(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    self.jsonl_path = os.path.join(os.fspath(workdir), METRICS_FILE)
    tb_dir = os.path.join(os.fspath(workdir), "tensorboard")
    epath.Path(tb_dir).mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.events_path = os.path.join(
        tb_dir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    )
    # Local: the event file stays open for appending. URL: what was written, rewritten whole.
    self._events = None if self._url else epath.Path(self.events_path).open("ab")
    self._event_bytes = bytearray()
    self._append_event(tfrecord(encode_event(now, 0, file_version="brain.Event:2")))

  def _append_event(self, record: bytes):
    if self._events is not None:
      self._events.write(record)
      self._events.flush()
      return
    self._event_bytes += record
    epath.Path(self.events_path).write_bytes(bytes(self._event_bytes))

  def rewind(self, step: int, *, drop_evals_at_step: bool = False):
    """Drops the lines of ``metrics.jsonl`` past ``step`` (a run resuming at checkpoint ``step``
    writes them again), and with ``drop_evals_at_step`` the evaluation lines at ``step`` too."""
    if not self.enabled or not epath.Path(self.jsonl_path).exists():
      return
    with epath.Path(self.jsonl_path).open("r") as f:
      lines = f.readlines()

    def keep(line):
      try:
        record = json.loads(line)
      except ValueError:
        return False  # a line cut short by a crash
      return record["step"] < step or (
          record["step"] == step and not (drop_evals_at_step and "loss" not in record)
      )

    kept = [line for line in lines if keep(line)]
    if len(kept) == len(lines):
      return
    if self._url:  # an object is replaced whole when written
      with self._reporting_errors(self.jsonl_path):
        epath.Path(self.jsonl_path).write_text("".join(kept))
      return
    tmp = epath.Path(self.jsonl_path + ".tmp")
    with self._reporting_errors(tmp):
      with tmp.open("w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
      tmp.replace(self.jsonl_path)

  @contextlib.contextmanager
  def _reporting_errors(self, path):
    try:
      yield
    except OSError as e:
      reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
      raise OSError(e.errno, f"cannot write metrics to {path}: {reason}", path) from e

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n"
    with self._reporting_errors(self.jsonl_path):
      if self._url:  # no appends on an object store: the file is rewritten with the new line
        path = epath.Path(self.jsonl_path)
        path.write_text((path.read_text() if path.exists() else "") + line)
      else:
        with epath.Path(self.jsonl_path).open("a") as f:
          f.write(line)
          f.flush()
          os.fsync(f.fileno())
    with self._reporting_errors(self.events_path):
      self._append_event(tfrecord(encode_event(time.time(), int(step), scalars=scalars)))

  def close(self):
    if self.enabled and self._events is not None and not self._events.closed:
      self._events.close()


def read_metrics(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl`` in file order (``[]`` when the file does not exist).

  A last line without its newline that does not parse (a write cut short by a crash) is left out;
  any other line that is not a JSON object with an integer ``step`` is an error naming the file
  and line.
  """
  if not epath.Path(path).exists():
    return []
  with epath.Path(path).open("r") as f:
    lines = f.readlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      if number == len(lines) and not line.endswith("\n"):
        break  # the write a crash interrupted
      raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from e
    if not isinstance(record, dict):
      raise ValueError(
          f"{path}, line {number}: expected a JSON object, got {type(record).__name__}"
      )
    if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
      raise ValueError(
          f"{path}, line {number}: field 'step' must be an integer, got {record.get('step')!r}"
      )
    records.append(record)
  return records
