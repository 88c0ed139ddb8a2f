"""CoVR (composed video retrieval): WebVid-CoVR / CC-CoVR annotation CSVs with the videos' frames.

A CSV row is a query: a reference video, a modification text (``edit``) and the target video that
the edited reference should retrieve. The split's candidates are all distinct target videos of
its rows. Each video is a folder of frame images under the frames root (``<root>/<video id>/``,
frames sorted by name = time order, digit runs compared as numbers so that ``f2.png`` comes before
``f10.png``), or a video file (``<root>/<video id>.mp4`` ...) decoded with PyAV (``av``) or OpenCV
(``cv2``) when one of them is installed. ``num_frames`` frames are sampled uniformly: the folder's
frames are cut into ``num_frames`` equal runs and the middle frame of each is kept (all frames
when there are fewer), as CoVR's own frame sampler does.

Output splits (written in this order):
- ``<split>_candidates``: ``id`` (video id), ``image`` (the sampled frames, a list of encoded
  PNG/JPEG images);
- ``<split>_queries``: ``id`` (``row <n>``, n = the CSV data row, 1 = the first after the header),
  ``image`` (the reference video's frames), ``text`` (the modification text), ``reference_id``,
  ``target_id``.

The frames are stored in the ``image`` field, the field mmret's readers (``mmret.data.sources``)
keep as encoded bytes, as a list. Skipped and counted: a video whose folder or file is missing
('missing_video'), whose file does not decode ('corrupt_video') or that has no readable frame
('no_frames'); a query whose target video was not written ('positive_not_in_pool'), whose
reference is its target ('same_video'), or with an empty cell ('missing_field', 'empty_edit'). A
sampled frame that does not decode is left out of its video and counted ('corrupt_image' ...);
the video keeps its other frames.
"""

import csv
import functools
import importlib.util
import io
import os
import re
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmret.data.importers import records
from mmret.data.importers.records import BadRecord
from mmret.data.importers.retrieval import _WrittenCandidates
from mmret.data.importers.writer import ImportPlan

# Where a record keeps its frames: the field readers leave as encoded bytes, here a list of them.
FRAMES_FIELD = "image"
# CSV column of each role; WebVid-CoVR's names by default (``pth1`` / ``pth2``: video paths under
# the frames root without extension, e.g. ``001051_001100/1234567``).
DEFAULT_COLUMNS = {"reference": "pth1", "edit": "edit", "target": "pth2"}
DEFAULT_NUM_FRAMES = 4
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
# Decoded video frames are stored as JPEG of this quality.
JPEG_QUALITY = 95


def _text(doc: str):
  return tfds.features.Text(doc=doc)


def _frames(doc: str):
  return tfds.features.Sequence(tfds.features.Scalar(np.object_), doc=doc)


def covr_candidates_features() -> dict:
  """CoVR candidates: one video as its sampled frames."""
  return {
      "id": _text("video id (the CSV's video path), unique within the split"),
      FRAMES_FIELD: _frames("the video's sampled frames in time order, encoded PNG/JPEG bytes"),
  }


def covr_queries_features() -> dict:
  """CoVR queries: a reference video and a modification text; the answer is one video."""
  return {
      "id": _text("query id 'row <n>' (CSV data row), unique within the split"),
      FRAMES_FIELD: _frames("the reference video's sampled frames, encoded PNG/JPEG bytes"),
      "text": _text("the modification text"),
      "reference_id": _text("id of the reference video"),
      "target_id": _text("id of the target video (a candidate of the split)"),
  }


def sample_frame_indices(count: int, num_frames: int) -> list[int]:
  """Positions of the frames kept out of ``count``: the middle of each of ``num_frames`` equal
  runs, or all positions when ``count <= num_frames``."""
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  if count <= num_frames:
    return list(range(count))
  edges = np.linspace(0, count, num_frames + 1).astype(int)
  return [int((start + end - 1) // 2) for start, end in zip(edges[:-1], edges[1:])]


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(folder: str) -> list[str]:
  """The image files of ``folder`` in time order (by name, digit runs compared as numbers)."""
  names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)]
  return sorted(names, key=_natural_key)


# ----------------------------------------------------------------------------------------------
# Video files.


def _jpeg(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


def _decode_with_av(path: str, num_frames: int) -> list[bytes]:
  import av  # pylint: disable=g-import-not-at-top

  with av.open(path) as container:
    count = container.streams.video[0].frames
    if not count:  # not in the header: count by decoding
      count = sum(1 for _ in container.decode(video=0))
  wanted = set(sample_frame_indices(count, num_frames))
  frames = []
  with av.open(path) as container:
    for index, frame in enumerate(container.decode(video=0)):
      if index in wanted:
        frames.append(_jpeg(frame.to_image()))
        if len(frames) == len(wanted):
          break
  return frames


def _decode_with_cv2(path: str, num_frames: int) -> list[bytes]:
  import cv2  # pylint: disable=g-import-not-at-top

  capture = cv2.VideoCapture(path)
  try:
    if not capture.isOpened():
      raise ValueError("OpenCV cannot open the file")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for index in sample_frame_indices(count, num_frames):
      capture.set(cv2.CAP_PROP_POS_FRAMES, index)
      ok, frame = capture.read()
      if ok:
        frames.append(_jpeg(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))))
  finally:
    capture.release()
  return frames


def video_decoder():
  """``decode(path, num_frames) -> encoded frames`` of PyAV, else OpenCV; None if neither is
  installed."""
  if importlib.util.find_spec("av") is not None:
    return _decode_with_av
  if importlib.util.find_spec("cv2") is not None:
    return _decode_with_cv2
  return None


# ----------------------------------------------------------------------------------------------
# The CSV.


def column_names(columns) -> dict:
  """role -> CSV column: ``DEFAULT_COLUMNS`` updated by ``columns`` (a mapping, or 'role=name'
  strings as ``--columns`` gives them)."""
  if isinstance(columns, Mapping):
    pairs = list(columns.items())
  else:
    pairs = []
    for entry in columns or ():
      role, sep, name = str(entry).partition("=")
      if not sep or not name.strip():
        raise ValueError(f"covr columns: expected 'role=column', got {entry!r}")
      pairs.append((role.strip(), name.strip()))
  unknown = sorted({role for role, _ in pairs} - set(DEFAULT_COLUMNS))
  if unknown:
    raise ValueError(f"covr columns: unknown roles {unknown}; roles are {sorted(DEFAULT_COLUMNS)}")
  return {**DEFAULT_COLUMNS, **dict(pairs)}


def _annotation_file(src: str, annotations) -> str:
  if annotations:
    return records.require_file(annotations, "CoVR annotation CSV")
  found = sorted(n for n in os.listdir(src) if n.lower().endswith(".csv"))
  if len(found) != 1:
    raise records.SchemaError(
        f"pass the CoVR annotation CSV with --annotations: {src} holds "
        f"{len(found)} CSV files ({found[:5]})"
    )
  return os.path.join(src, found[0])


def read_rows(path: str, columns: Mapping) -> list:
  """(query id, reference, edit, target) per data row, or the row's BadRecord."""
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    for role, name in columns.items():
      if name not in header:
        raise records.SchemaError(
            f"{path}: no column {name!r} (the {role} column; columns: {header}); "
            f"name the right one with --columns={role}=COLUMN"
        )
    rows = []
    for number, row in enumerate(reader, start=1):
      query_id = f"row {number}"
      values = {role: (row.get(name) or "").strip() for role, name in columns.items()}
      empty = [columns[role] for role in ("reference", "target") if not values[role]]
      if empty:
        rows.append(BadRecord("missing_field", query_id, path, f"empty column(s) {empty}"))
      elif not values["edit"]:
        rows.append(BadRecord("empty_edit", query_id, path, f"column {columns['edit']!r} is empty"))
      else:
        rows.append((query_id, values["reference"], values["edit"], values["target"]))
  return rows


def locate_video(root: str, video_id: str):
  """('frames', folder) or ('video', file) of ``video_id`` under ``root``; None when absent."""
  path = os.path.join(root, video_id)
  if os.path.isdir(path):
    return "frames", path
  stem, extension = os.path.splitext(path)
  if extension.lower() in VIDEO_EXTENSIONS:
    if os.path.isdir(stem):
      return "frames", stem
    if os.path.isfile(path):
      return "video", path
  for extension in VIDEO_EXTENSIONS:
    if os.path.isfile(path + extension):
      return "video", path + extension
  return None


# ----------------------------------------------------------------------------------------------
# The plan.


def plan_covr(
    src: str,
    *,
    split: str = "test",
    annotations: str | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    columns=(),
    problems: records.ProblemLog,
) -> ImportPlan:
  """CoVR: the annotation CSV ``annotations`` (default: the one CSV in ``src``) with the videos
  under ``src`` (the frames root: ``<src>/<video id>/`` frame folders or video files).

  ``columns``: CSV column of each role, overriding ``DEFAULT_COLUMNS`` (reference=pth1,
  edit=edit, target=pth2), e.g. ``{'reference': 'video1', 'target': 'video2'}``.
  ``num_frames``: frames sampled per video (default 4).
  """
  num_frames = int(num_frames)
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  names = column_names(columns)
  csv_path = _annotation_file(src, annotations)
  rows = read_rows(csv_path, names)
  parsed = [row for row in rows if not isinstance(row, BadRecord)]
  video_ids = list(dict.fromkeys(v for _, ref, _, target in parsed for v in (ref, target)))
  location = {video_id: locate_video(src, video_id) for video_id in video_ids}
  video_files = [where[1] for where in location.values() if where and where[0] == "video"]
  decoder = video_decoder() if video_files else None
  if video_files and decoder is None:
    raise records.SchemaError(
        f"{len(video_files)} videos are video files (first: {video_files[0]}) and no video "
        "decoder is installed: install PyAV (pip install av) or OpenCV, or extract each video's "
        f"frames to a folder <frames root>/<video id>/ (e.g. ffmpeg -i {video_files[0]} "
        "-vf fps=1 <folder>/%05d.jpg)"
    )
  reader = records.ImageReader(src)
  written = _WrittenCandidates()
  candidates_split, queries_split = f"{split}_candidates", f"{split}_queries"

  @functools.lru_cache(maxsize=256)  # a reference video is read by each of its queries
  def decoded(path: str) -> tuple:
    return tuple(decoder(path, num_frames))

  def read_video(video_id: str, record_id: str, split_name: str) -> list:
    where = location.get(video_id)
    if where is None:
      raise BadRecord(
          "missing_video",
          record_id,
          csv_path,
          f"video {video_id!r}: no frame folder {os.path.join(src, video_id)} nor video file",
      )
    kind, path = where
    if kind == "video":
      try:
        frames = list(decoded(path))
      except Exception as e:  # decoders raise many types for a damaged file
        raise BadRecord(
            "corrupt_video", record_id, csv_path, f"cannot decode {path}: {type(e).__name__}: {e}"
        ) from e
    else:
      files = frame_files(path)
      frames = []
      for index in sample_frame_indices(len(files), num_frames):
        relative = os.path.relpath(os.path.join(path, files[index]), src)
        try:
          frames.append(reader.read(relative, record_id, csv_path))
        except BadRecord as problem:
          if problems.on_error == "fail":
            raise
          problems.report(split_name, problem, skipped=False)  # the video keeps its other frames
    if not frames:
      raise BadRecord("no_frames", record_id, csv_path, f"video {video_id!r}: no readable frame")
    return frames

  def candidates():
    targets = dict.fromkeys(target for _, _, _, target in parsed)
    for video_id in targets:

      def build(video_id=video_id):
        return {
            "id": video_id,
            FRAMES_FIELD: read_video(video_id, video_id, candidates_split),
        }

      yield video_id, csv_path, build

  def queries():
    written.check_complete()
    for row in rows:
      if isinstance(row, BadRecord):
        yield row.record_id, csv_path, _raiser(row)
        continue
      query_id, reference, edit, target = row

      def build(query_id=query_id, reference=reference, edit=edit, target=target):
        if reference == target:
          raise BadRecord(
              "same_video", query_id, csv_path, f"the reference is the target ({target!r})"
          )
        if target not in written.ids:
          raise BadRecord(
              "positive_not_in_pool",
              query_id,
              csv_path,
              f"the target video {target!r} was not written",
          )
        return {
            "id": query_id,
            FRAMES_FIELD: read_video(reference, query_id, queries_split),
            "text": edit,
            "reference_id": reference,
            "target_id": target,
        }

      yield query_id, csv_path, build

  return ImportPlan(
      f"CoVR {split} imported from {csv_path} with frames under {src} "
      f"({num_frames} frames per video)",
      schemas={
          candidates_split: covr_candidates_features(),
          queries_split: covr_queries_features(),
      },
      sources={candidates_split: written.wrap(candidates), queries_split: queries},
  )


def _raiser(problem: BadRecord):

  def build():
    raise problem

  return build
