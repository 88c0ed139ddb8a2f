"""Importers turning real dataset formats into mmret's tfds ArrayRecord datasets.

Formats (see each planner for its layout and options):
- ``coco``: COCO captions JSON + images -> PAIRS ``<split>`` and CAPTION5 ``<split>_caption5``.
- ``covr``: WebVid-CoVR / CC-CoVR annotation CSV + per-video frame folders -> ``<split>_candidates``
  (target videos) / ``<split>_queries`` (reference video, modification text, target id).
- ``karpathy``: Karpathy split JSON + images -> PAIRS ``train`` (train+restval), CAPTION5
  ``val`` / ``test``.
- ``lcs558k``: LCS-558K conversations JSON + images -> PAIRS ``<split>``.
- ``mbeir``: M-BEIR queries, local pools, qrels, instructions -> RETRIEVAL
  ``<split>_candidates`` / ``<split>_queries``.
- ``mmeb``: MMEB rows -> RETRIEVAL ``<split>_candidates`` / ``<split>_queries`` with per-query
  ``candidate_ids``.

The record schemas' feature definitions (``pairs_features`` ... ``candidates_features``) live in
``schema`` and are shared by every mmret dataset builder.
"""

import inspect

from mmret.data.importers import captions
from mmret.data.importers import covr
from mmret.data.importers import records
from mmret.data.importers import retrieval
from mmret.data.importers.records import BadRecord, ProblemLog, RecordError, SchemaError
from mmret.data.importers.schema import (
    blank_example,
    caption5_features,
    candidates_features,
    merge_features,
    pairs_features,
    queries_features,
)
from mmret.data.importers.writer import EmptySplitError, ImportPlan, write_dataset

PLANNERS = {
    "coco": captions.plan_coco,
    "covr": covr.plan_covr,
    "karpathy": captions.plan_karpathy,
    "lcs558k": captions.plan_lcs558k,
    "mbeir": retrieval.plan_mbeir,
    "mmeb": retrieval.plan_mmeb,
}
FORMATS = tuple(PLANNERS)


def plan_import(format_name: str, src: str, problems: ProblemLog, **options) -> ImportPlan:
  """The ``ImportPlan`` of ``src`` read as ``format_name``; options left at None keep defaults."""
  if format_name not in PLANNERS:
    raise ValueError(f"unknown format {format_name!r}; choose one of {FORMATS}")
  planner = PLANNERS[format_name]
  accepted = inspect.signature(planner).parameters
  options = {k: v for k, v in options.items() if v is not None}
  not_applicable = sorted(set(options) - set(accepted))
  if not_applicable:
    raise ValueError(
        f"options {not_applicable} do not apply to format {format_name!r} "
        f"(it takes {sorted(set(accepted) - {'src', 'problems'})})"
    )
  if "problems" in accepted:
    options["problems"] = problems
  records.require_dir(src, f"{format_name} source folder")
  return planner(src, **options)


def import_dataset(
    format_name: str,
    src: str,
    out: str,
    *,
    on_error: str = "skip",
    overwrite: bool = False,
    max_pixels: int | None = None,
    **options,
) -> dict:
  """Imports ``src`` (in ``format_name``) into the tfds dataset directory ``out``.

  Bad records are skipped and counted (``on_error='skip'``) or stop the import with a
  ``RecordError`` naming the file and record (``'fail'``); schema problems always raise
  ``SchemaError``. Any failure of one record (undecodable or over ``max_pixels`` image, text that
  is not valid UTF-8, anything else) is such a bad record. ``max_pixels``: images with more pixels
  are skipped as 'too_many_pixels' (default ``records.DEFAULT_MAX_PIXELS``, 40 megapixels).
  Returns the summary also saved as ``out/import_summary.json``.
  """
  problems = ProblemLog(on_error)
  plan = plan_import(format_name, src, problems, **options)
  metadata = {
      "format": format_name,
      "src": str(src),
      "options": {
          k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if v is not None
      },
  }
  with records.image_limits(max_pixels):
    write_dataset(plan, out, problems, metadata=metadata, overwrite=overwrite)
  return {**metadata, **problems.summary()}


__all__ = [
    "BadRecord",
    "EmptySplitError",
    "FORMATS",
    "ImportPlan",
    "ProblemLog",
    "RecordError",
    "SchemaError",
    "blank_example",
    "caption5_features",
    "candidates_features",
    "import_dataset",
    "merge_features",
    "pairs_features",
    "plan_import",
    "queries_features",
    "write_dataset",
]
