"""Progress lines for long host-side loops: done / total, rate, ETA and a final elapsed time.

  progress = Progress("embedding 5000 items", total=79, unit="batches", warmup=True)
  for batch in batches:
    ...
    progress.update()
  progress.finish()

Lines go to absl logging (INFO), at most one status line every ``every_s`` seconds. Counting is
done on the host by the caller (e.g. once per batch it already fetched), so a progress line never
waits for a device. ``warmup=True`` treats the first update as compilation: rate and ETA are
measured from it on, and the final line says how long it took.
"""

import time
from typing import Callable, Optional

from absl import logging


def format_duration(seconds: float) -> str:
  """``12.3 s`` under a minute, ``h:mm:ss`` from then on."""
  seconds = max(float(seconds), 0.0)
  if seconds < 60:
    return f"{seconds:.1f} s"
  whole = int(round(seconds))
  return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _log_info(line: str) -> None:
  logging.info("%s", line)


class Progress:
  """Counts units of work done (of ``total``, when known) and logs rate and ETA.

  Args:
    what: what is being done, e.g. ``"embedding 5000 items (z_image)"``; starts every line.
    total: units expected (None: unknown, no percentage or ETA).
    unit: name of the units counted (plural), e.g. ``"batches"``.
    every_s: at most one status line per this many seconds.
    warmup: the first update includes compilation; rate and ETA exclude it.
    announce: log ``"<what> ..."`` at creation (a line before a silent compile).
    min_seconds: the final line is logged only when the work ran at least this long or a status
      line was logged (short, frequent jobs stay quiet).
    clock: seconds, monotonic (``time.monotonic``; tests pass a fake one).
    log: receives each line (default: absl ``logging.info``).
  """

  def __init__(
      self,
      what: str,
      total: Optional[int] = None,
      *,
      unit: str = "items",
      every_s: float = 20.0,
      warmup: bool = False,
      announce: bool = True,
      min_seconds: float = 0.0,
      clock: Callable[[], float] = time.monotonic,
      log: Optional[Callable[[str], None]] = None,
  ):
    self.what, self.total, self.unit = what, total, unit
    self.every_s, self.warmup, self.min_seconds = float(every_s), warmup, float(min_seconds)
    self._clock = clock
    self._log = log or _log_info
    self.done = 0
    self.start = self._last_line = clock()
    self._first_at: Optional[float] = None  # clock and count at the first update
    self._first_done = 0
    self._logged_status = False
    self._finished = False
    if announce:
      total_text = f" ({total} {unit})" if total is not None else ""
      self._log(f"{what}{total_text} ...")

  @property
  def elapsed(self) -> float:
    return self._clock() - self.start

  @property
  def first_seconds(self) -> Optional[float]:
    """Seconds until the first update (compilation included), None before it."""
    return None if self._first_at is None else self._first_at - self.start

  @property
  def rate(self) -> Optional[float]:
    """Units per second: since the first update with ``warmup``, else since the start; None
    while not measurable."""
    now = self._clock()
    if self.warmup:
      if self._first_at is None or self.done <= self._first_done or now <= self._first_at:
        return None
      return (self.done - self._first_done) / (now - self._first_at)
    if self.done == 0 or now <= self.start:
      return None
    return self.done / (now - self.start)

  @property
  def eta(self) -> Optional[float]:
    """Seconds left at the current rate; None when the total or the rate is unknown."""
    rate = self.rate
    if self.total is None or not rate:
      return None
    return max(self.total - self.done, 0) / rate

  def status(self) -> str:
    """One line: done (of total, percent), rate and ETA."""
    count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
    parts = [f"{self.what}: {count} {self.unit}"]
    if self.total:
      parts[0] += f" ({100.0 * min(self.done, self.total) / self.total:.0f}%)"
    rate = self.rate
    if rate is not None:
      parts.append(f"{rate:.3g} {self.unit}/s")
      eta = self.eta
      if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    elif self.warmup and self.first_seconds is not None:
      parts.append(f"the first took {format_duration(self.first_seconds)} (compile included)")
    return " | ".join(parts)

  def update(self, count: int = 1) -> None:
    """Adds ``count`` units done; logs a status line when ``every_s`` has passed since the last."""
    now = self._clock()
    self.done += count
    if self._first_at is None:
      self._first_at, self._first_done = now, self.done
    if now - self._last_line >= self.every_s:
      self._last_line = now
      self._logged_status = True
      self._log(self.status())

  def finish(self, message: Optional[str] = None) -> str:
    """The final line (logged unless the work was shorter than ``min_seconds``): ``message`` (or
    ``"<what>: done"``), the units done and the elapsed time."""
    elapsed = self.elapsed
    head = message or f"{self.what}: done"
    line = f"{head} in {format_duration(elapsed)}"
    if self.done:
      count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
      details = [f"{count} {self.unit}"]
      if self.warmup and self.first_seconds is not None:
        rate = self.rate
        if rate is not None:
          details.append(f"{rate:.3g} {self.unit}/s")
        details.append(f"the first took {format_duration(self.first_seconds)} (compile included)")
      elif elapsed > 0:
        details.append(f"{self.done / elapsed:.3g} {self.unit}/s")
      line += f" ({'; '.join(details)})"
    if not self._finished and (self._logged_status or elapsed >= self.min_seconds):
      self._log(line)
    self._finished = True
    return line

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:  # a failure is reported by its exception, not by a "done" line
      self.finish()
