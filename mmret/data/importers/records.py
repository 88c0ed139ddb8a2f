"""Reading source records: errors, the problem log, annotation files and images.

Two kinds of bad input:
- a *schema error* (a file missing entirely, top-level JSON of the wrong shape) always stops the
  import with ``SchemaError``;
- a *record problem* (missing or corrupt image, empty caption, missing field, duplicate id) skips
  the record and counts it in ``ProblemLog``, or, with ``on_error='fail'``, stops the import with a
  ``RecordError`` naming the file and the record.
"""

import collections
import contextlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image

ON_ERROR_CHOICES = ("skip", "fail")
# Images with more pixels are skipped ('too_many_pixels') before they are decoded: a huge image
# would take minutes and gigabytes to decode. ``import_dataset(max_pixels=...)`` changes it.
DEFAULT_MAX_PIXELS = 40_000_000
_limits = {"max_pixels": DEFAULT_MAX_PIXELS}


@contextlib.contextmanager
def image_limits(max_pixels: int | None):
  """Sets the pixel-count limit of the images read inside the ``with`` block."""
  if max_pixels is not None and max_pixels <= 0:
    raise ValueError(f"max_pixels must be > 0, got {max_pixels}")
  previous = dict(_limits)
  if max_pixels is not None:
    _limits["max_pixels"] = int(max_pixels)
  try:
    yield
  finally:
    _limits.update(previous)


# Encodings stored as they are; anything else PIL reads is re-encoded to PNG.
STORED_IMAGE_FORMATS = ("PNG", "JPEG")
_BYTES_IO_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")


class SchemaError(ValueError):
  """A source file is missing or not shaped like its format; the import cannot go on."""


class BadRecord(Exception):
  """One source record cannot be imported.

  Attributes:
    reason: short machine-readable cause, e.g. 'corrupt_image' (the summary counts by it).
    record_id: id of the record (or its position when it has no usable id).
    source: the file the record comes from.
    detail: human-readable explanation (e.g. the image path and PIL's message).
  """

  def __init__(self, reason: str, record_id: str, source: str, detail: str):
    super().__init__(f"{source}: record {record_id!r}: {reason}: {detail}")
    self.reason, self.record_id, self.source, self.detail = reason, record_id, source, detail


class RecordError(ValueError):
  """Raised instead of skipping a bad record when the import runs with on_error='fail'."""


class ProblemLog:
  """Counts skipped records per split and reason, keeping the first few examples of each.

  Args:
    on_error: 'skip' counts a bad record and goes on; 'fail' raises ``RecordError``.
    examples_per_reason: how many offending records to keep per (split, reason).
  """

  def __init__(self, on_error: str = "skip", examples_per_reason: int = 5):
    if on_error not in ON_ERROR_CHOICES:
      raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    self.on_error = on_error
    self.examples_per_reason = examples_per_reason
    self._counts = collections.defaultdict(collections.Counter)  # split -> reason -> count
    self._examples = collections.defaultdict(lambda: collections.defaultdict(list))
    self._skipped = collections.Counter()  # split -> records left out
    self.written = collections.Counter()  # split -> records written

  def report(self, split: str, problem: BadRecord, skipped: bool = True) -> None:
    """Records ``problem`` in ``split`` (raises in 'fail' mode).

    ``skipped=False`` is for a record that is kept with a part removed (e.g. a query losing one of
    several positives whose candidate was skipped).
    """
    if self.on_error == "fail":
      raise RecordError(str(problem)) from problem
    self._counts[split][problem.reason] += 1
    self._skipped[split] += int(skipped)
    examples = self._examples[split][problem.reason]
    if len(examples) < self.examples_per_reason:
      examples.append({"id": problem.record_id, "file": problem.source, "detail": problem.detail})

  def attempt(self, split: str, build: Callable[[], Any]) -> Any:
    """``build()``, or None after reporting the ``BadRecord`` it raised."""
    try:
      return build()
    except BadRecord as problem:
      self.report(split, problem)
      return None

  def skipped(self, split: str) -> int:
    return self._skipped[split]

  def reasons(self, split: str) -> dict:
    return dict(self._counts[split])

  def summary(self) -> dict:
    """JSON-ready per-split summary: written, skipped, and per-reason counts with examples."""
    splits = sorted(set(self.written) | set(self._counts))
    return {
        "on_error": self.on_error,
        "splits": {
            split: {
                "written": self.written[split],
                "skipped": self._skipped[split],
                "problems": {
                    reason: {"count": count, "examples": self._examples[split][reason]}
                    for reason, count in sorted(self._counts[split].items())
                },
            }
            for split in splits
        },
        "total_written": sum(self.written.values()),
        "total_skipped": sum(self._skipped.values()),
    }


def format_summary(summary: dict) -> str:
  """A few human-readable lines from ``ProblemLog.summary()``."""
  lines = []
  for split, info in summary["splits"].items():
    lines.append(f"{split}: {info['written']} written, {info['skipped']} skipped")
    for reason, problem in info["problems"].items():
      first = problem["examples"][0] if problem["examples"] else {}
      lines.append(
          f"  {reason}: {problem['count']} " f"(first: {first.get('id')!r} in {first.get('file')})"
      )
  return "\n".join(lines)


def require_file(path: str, what: str) -> str:
  """``path`` if it is an existing file, else a SchemaError naming ``what`` it should hold."""
  if not os.path.isfile(path):
    raise SchemaError(f"{what} not found: {path}")
  return path


def require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise SchemaError(f"{what} not found: {path}")
  return path


def load_json(path: str, expected_type: type, what: str) -> Any:
  """The parsed JSON file at ``path``, which must exist and hold a top-level ``expected_type``."""
  require_file(path, what)
  try:
    with open(path, encoding="utf-8") as f:
      content = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SchemaError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(content, expected_type):
    raise SchemaError(
        f"{path}: top-level JSON must be a {expected_type.__name__} ({what}), "
        f"got {type(content).__name__}"
    )
  return content


def iter_jsonl(path: str, what: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed object) per non-empty line; a line that does not parse is yielded as a
  ``BadRecord`` so that the caller reports it like any other bad record."""
  require_file(path, what)
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        yield line_number, BadRecord("invalid_json", f"line {line_number}", path, str(e))
        continue
      if not isinstance(row, dict):
        yield line_number, BadRecord(
            "invalid_json",
            f"line {line_number}",
            path,
            f"expected a JSON object, got {type(row).__name__}",
        )
        continue
      yield line_number, row


def get_field(row: dict, name: str, record_id: str, source: str, kind: type = str) -> Any:
  """``row[name]``, which must be present, not None and of type ``kind``, else a BadRecord."""
  if not isinstance(row, dict):
    raise BadRecord(
        "invalid_record", record_id, source, f"expected a JSON object, got {type(row).__name__}"
    )
  if row.get(name) is None:
    raise BadRecord("missing_field", record_id, source, f"field {name!r} is missing")
  value = row[name]
  if kind is str and isinstance(value, int) and not isinstance(value, bool):
    value = str(value)  # numeric ids and file names are fine as text
  if not isinstance(value, kind):
    raise BadRecord(
        "bad_field",
        record_id,
        source,
        f"field {name!r} must be {kind.__name__}, got {type(value).__name__}",
    )
  return value


def clean_text(text: str, field: str, record_id: str, source: str) -> str:
  """``text`` stripped; an empty text is a BadRecord ('empty_<field>')."""
  text = text.strip()
  if not text:
    raise BadRecord(f"empty_{field}", record_id, source, f"{field} is empty")
  return text


class ImageReader:
  """Reads image files as encoded bytes, checking that each decodes.

  A file's verdict is cached, so an image shared by several records (COCO's 5 captions) is decoded
  once. PNG and JPEG are stored as they are; other formats PIL reads are re-encoded to PNG.
  """

  def __init__(self, root: str):
    self.root = root
    # path -> True (stored as is), False (re-encoded to PNG) or (reason, detail) of its problem.
    self._verdicts: dict[str, bool | tuple[str, str]] = {}

  def path(self, relative_path: str) -> str:
    return os.path.join(self.root, relative_path)

  def read(self, relative_path: str, record_id: str, source: str) -> bytes:
    """Encoded bytes of the image at ``root/relative_path``; BadRecord if missing or corrupt."""
    path = self.path(relative_path)
    verdict = self._verdicts.get(path)
    if isinstance(verdict, tuple):
      raise BadRecord(verdict[0], record_id, source, verdict[1])
    try:
      with open(path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return self._fail(path, "missing_image", f"image file not found: {path}", record_id, source)
    except OSError as e:
      return self._fail(path, "unreadable_image", f"cannot read {path}: {e}", record_id, source)
    if verdict is True:
      return data  # decoded fine before and stored as is: only the bytes are needed
    try:
      stored = _checked_image_bytes(data, _limits["max_pixels"])
    except _TooManyPixels as e:
      return self._fail(path, "too_many_pixels", f"{path}: {e}", record_id, source)
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError...)
      message = _BYTES_IO_REPR.sub("the file", str(e))  # PIL names the in-memory buffer
      return self._fail(
          path, "corrupt_image", f"cannot decode {path}: {message}", record_id, source
      )
    self._verdicts[path] = stored is data
    return stored

  def _fail(self, path, reason, detail, record_id, source):
    self._verdicts[path] = (reason, detail)
    raise BadRecord(reason, record_id, source, detail)


class _TooManyPixels(ValueError):
  pass


def _checked_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
  """``data`` itself if it fully decodes as PNG/JPEG, its PNG re-encoding if another format."""
  with Image.open(io.BytesIO(data)) as image:
    width, height = image.size  # from the header: checked before decoding
    if width * height > max_pixels:
      raise _TooManyPixels(
          f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
          "(--max_pixels)"
      )
    image.load()  # a full decode: Image.open alone reads only the header
    if image.format in STORED_IMAGE_FORMATS:
      return data
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
      image = image.convert("RGB")  # e.g. CMYK, which PNG cannot hold
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def modality_of(has_image: bool, has_text: bool) -> str:
  """The contract's modality name for a record holding an image and/or a text."""
  if has_image and has_text:
    return "image,text"
  return "image" if has_image else "text"
