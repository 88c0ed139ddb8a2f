"""Retrieval formats: M-BEIR (UniIR) and MMEB.

Both become two splits, ``<split>_candidates`` then ``<split>_queries`` (RETRIEVAL schema). The
candidates are written first; each query's ``positive_ids`` / ``candidate_ids`` then keep only
candidates that were written. A query whose correct candidate was skipped is skipped
('positive_not_in_pool'); one that only loses some of several positives, or some of its own
candidates, is kept and the loss is counted ('positive_dropped' / 'candidate_dropped').
"""

import csv
import glob
import os
import re

from mmret.data.importers import records
from mmret.data.importers import schema
from mmret.data.importers.records import BadRecord
from mmret.data.importers.writer import ImportPlan

# Placeholder image tokens that MMEB's texts carry for Phi-3-V style models, e.g. "<|image_1|>".
MMEB_IMAGE_TOKEN = re.compile(r"<\|image_\d+\|>")
MMEB_FILE_PATTERNS = ("*.parquet", "*.jsonl", "*.json")


class _WrittenCandidates:
  """Ids of the candidates written so far; queries are generated after all candidates."""

  def __init__(self):
    self.ids = set()
    self.complete = False

  def wrap(self, source):
    """``source`` with each successfully built candidate's id remembered."""

    def wrapped():
      for record_id, source_file, build in source():

        def remembering_build(build=build, record_id=record_id):
          record = build()
          self.ids.add(record_id)
          return record

        yield record_id, source_file, remembering_build
      self.complete = True

    return wrapped

  def check_complete(self):
    if not self.complete:
      raise RuntimeError("queries must be generated after every candidate (split order)")


def _read_text_and_image(row, text_key, image_key, modality, reader, record_id, source):
  """(text, image bytes) of a record, checked against its declared ``modality``."""
  if modality not in schema.MODALITIES:
    raise BadRecord(
        "bad_modality",
        record_id,
        source,
        f"modality {modality!r} is not one of {schema.MODALITIES}",
    )
  text = row.get(text_key) or ""
  image_path = row.get(image_key) or ""
  if not isinstance(text, str) or not isinstance(image_path, str):
    raise BadRecord("bad_field", record_id, source, f"{text_key!r} and {image_key!r} must be text")
  text = text.strip()
  if "text" in modality and not text:
    raise BadRecord(
        "empty_text", record_id, source, f"modality {modality!r} but {text_key!r} is empty"
    )
  if "image" in modality and not image_path:
    raise BadRecord(
        "missing_image", record_id, source, f"modality {modality!r} but {image_key!r} is empty"
    )
  image = reader.read(image_path, record_id, source) if "image" in modality else b""
  return (text if "text" in modality else ""), image


def _report_dropped(dropped, problems, split, record_id, source, reason):
  """Counts, under ``reason``, each candidate id a kept record lost (its candidate was skipped)."""
  for candidate_id in dropped:
    problems.report(
        split,
        BadRecord(
            reason, record_id, source, f"candidate {candidate_id!r} is not in the written pool"
        ),
        skipped=False,
    )


# ----------------------------------------------------------------------------------------------
# M-BEIR


def _mbeir_query_files(src: str, split: str, tasks: tuple) -> dict:
  """task name -> query JSONL; all tasks of the split when ``tasks`` is empty."""
  query_dir = records.require_dir(
      os.path.join(src, "query", split), f"M-BEIR query folder of split {split!r}"
  )
  if tasks:
    return {
        t: records.require_file(
            os.path.join(query_dir, f"mbeir_{t}_{split}.jsonl"), f"M-BEIR queries of task {t!r}"
        )
        for t in tasks
    }
  found = sorted(glob.glob(os.path.join(query_dir, f"mbeir_*_{split}.jsonl")))
  if not found:
    raise records.SchemaError(f"no M-BEIR query files mbeir_<task>_{split}.jsonl in {query_dir}")
  prefix, suffix = "mbeir_", f"_{split}.jsonl"
  return {os.path.basename(f)[len(prefix) : -len(suffix)]: f for f in found}


def _mbeir_pool_file(src: str, task: str, split: str) -> str:
  """The task's candidate pool: in ``cand_pool/local``, the split-specific file when there is one
  (MSCOCO's 5K test pools); else ``cand_pool/global`` (the ``union`` training task)."""
  candidates = [
      os.path.join(src, "cand_pool", "local", f"mbeir_{task}_{split}_cand_pool.jsonl"),
      os.path.join(src, "cand_pool", "local", f"mbeir_{task}_cand_pool.jsonl"),
      os.path.join(src, "cand_pool", "global", f"mbeir_{task}_{split}_cand_pool.jsonl"),
  ]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise records.SchemaError(
      f"M-BEIR candidate pool of task {task!r} not found; looked for " f"{', '.join(candidates)}"
  )


def _load_mbeir_qrels(path: str) -> dict:
  """qid -> relevant dids from a TREC-style qrels file (``qid 0 did relevance [task_id]``)."""
  relevant = {}
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) < 4 or not parts[3].lstrip("-").isdigit():
        raise records.SchemaError(
            f"{path}:{line_number}: expected 'qid 0 did relevance', got {line!r}"
        )
      if int(parts[3]) > 0:
        relevant.setdefault(parts[0], []).append(parts[2])
  return relevant


def _load_mbeir_instructions(path: str) -> dict:
  """(dataset id, query modality, candidate modality) -> first instruction of the TSV row."""
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t"))
  if not rows:
    raise records.SchemaError(f"{path}: empty instruction file")
  header = [h.strip() for h in rows[0]]
  needed = ("query_modality", "cand_modality", "dataset_id")
  prompts = [i for i, h in enumerate(header) if h.startswith("prompt")]
  if any(h not in header for h in needed) or not prompts:
    raise records.SchemaError(
        f"{path}: instruction TSV needs columns {needed} and prompt_1..., " f"got {header}"
    )
  col = {h: header.index(h) for h in needed}
  instructions = {}
  for row in rows[1:]:
    if len(row) <= max(col.values()):
      continue
    texts = [row[i].strip() for i in prompts if i < len(row) and row[i].strip()]
    if texts:
      key = (
          row[col["dataset_id"]].strip(),
          row[col["query_modality"]].strip(),
          row[col["cand_modality"]].strip(),
      )
      instructions[key] = texts[0]
  return instructions


def plan_mbeir(
    src: str,
    *,
    split: str = "test",
    tasks: tuple = (),
    qrels: bool = True,
    instructions: bool = True,
    problems: records.ProblemLog,
) -> ImportPlan:
  """M-BEIR (UniIR layout under ``src``): queries, local candidate pools, qrels, instructions.

  Per task T (e.g. ``mscoco_task3``; all tasks of ``split`` when ``tasks`` is empty):
  ``query/<split>/mbeir_T_<split>.jsonl`` (qid, query_txt, query_img_path, query_modality,
  pos_cand_list), ``cand_pool/local/mbeir_T[_<split>]_cand_pool.jsonl`` (did, txt, img_path,
  modality), optionally ``qrels/<split>/mbeir_T_<split>_qrels.txt`` (used as positives instead of
  pos_cand_list when present and ``qrels``) and ``instructions/query_instructions.tsv`` (the
  first prompt of the query's (dataset id, query modality, positive's modality) row). Image paths
  are relative to ``src``. Each task's pool and task name is T; the global pool is all candidates.
  """
  query_files = _mbeir_query_files(src, split, tuple(tasks))
  pool_files = {task: _mbeir_pool_file(src, task, split) for task in query_files}
  instruction_file = os.path.join(src, "instructions", "query_instructions.tsv")
  instruction_of = (
      _load_mbeir_instructions(instruction_file)
      if instructions and os.path.isfile(instruction_file)
      else {}
  )
  reader = records.ImageReader(src)
  written = _WrittenCandidates()
  candidate_modality = {}  # did -> modality, for the instruction lookup
  queries_split = f"{split}_queries"

  def candidates():
    for task, pool_file in pool_files.items():
      for line_number, row in records.iter_jsonl(pool_file, f"M-BEIR pool of task {task!r}"):
        if isinstance(row, BadRecord):
          yield row.record_id, pool_file, _raiser(row)
          continue
        record_id = str(row["did"]) if row.get("did") is not None else f"line {line_number}"

        def build(row=row, record_id=record_id, task=task, pool_file=pool_file):
          records.get_field(row, "did", record_id, pool_file)
          modality = records.get_field(row, "modality", record_id, pool_file)
          text, image = _read_text_and_image(
              row, "txt", "img_path", modality, reader, record_id, pool_file
          )
          candidate_modality[record_id] = modality
          return {"id": record_id, "image": image, "text": text, "modality": modality, "pool": task}

        yield record_id, pool_file, build

  def queries():
    written.check_complete()
    for task, query_file in query_files.items():
      qrels_file = os.path.join(src, "qrels", split, f"mbeir_{task}_{split}_qrels.txt")
      relevant = _load_mbeir_qrels(qrels_file) if qrels and os.path.isfile(qrels_file) else None
      for line_number, row in records.iter_jsonl(query_file, f"M-BEIR queries of task {task!r}"):
        if isinstance(row, BadRecord):
          yield row.record_id, query_file, _raiser(row)
          continue
        record_id = str(row["qid"]) if row.get("qid") is not None else f"line {line_number}"

        def build(
            row=row, record_id=record_id, task=task, query_file=query_file, relevant=relevant
        ):
          records.get_field(row, "qid", record_id, query_file)
          modality = records.get_field(row, "query_modality", record_id, query_file)
          if relevant is not None:
            positives = relevant.get(record_id, [])
          else:
            positives = [
                str(p)
                for p in records.get_field(row, "pos_cand_list", record_id, query_file, kind=list)
            ]
          if not positives:
            raise BadRecord(
                "no_positive",
                record_id,
                query_file,
                "no positive in " + ("the qrels" if relevant is not None else "'pos_cand_list'"),
            )
          kept = [p for p in positives if p in written.ids]
          if not kept:
            raise BadRecord(
                "positive_not_in_pool",
                record_id,
                query_file,
                f"none of the positives {positives[:5]} is a written candidate",
            )
          text, image = _read_text_and_image(
              row, "query_txt", "query_img_path", modality, reader, record_id, query_file
          )
          _report_dropped(
              [p for p in positives if p not in written.ids],
              problems,
              queries_split,
              record_id,
              query_file,
              "positive_dropped",
          )
          dataset_id = record_id.split(":")[0]
          instruction = instruction_of.get(
              (dataset_id, modality, candidate_modality.get(kept[0])), ""
          )
          return {
              "id": record_id,
              "image": image,
              "text": text,
              "modality": modality,
              "pool": task,
              "task": task,
              "instruction": instruction,
              "positive_ids": kept,
          }

        yield record_id, query_file, build

  return _retrieval_plan(
      f"M-BEIR {split} imported from {src} (tasks: {', '.join(query_files)})",
      split,
      written.wrap(candidates),
      queries,
  )


def _retrieval_plan(description, split, candidates, queries) -> ImportPlan:
  """Candidates first: queries keep only the candidates that were written."""
  return ImportPlan(
      description,
      schemas={
          f"{split}_candidates": schema.candidates_features(),
          f"{split}_queries": schema.queries_features(),
      },
      sources={f"{split}_candidates": candidates, f"{split}_queries": queries},
  )


def _raiser(problem: BadRecord):

  def build():
    raise problem

  return build


# ----------------------------------------------------------------------------------------------
# MMEB


def _mmeb_subset_files(src: str, tasks: tuple) -> dict:
  """subset -> data files: ``<src>/<subset>/*.parquet|jsonl|json`` or ``<src>/<subset>.jsonl``."""
  records.require_dir(src, "MMEB folder")
  found = {}
  for entry in sorted(os.listdir(src)):
    path = os.path.join(src, entry)
    if os.path.isdir(path):
      files = sorted(
          f for pattern in MMEB_FILE_PATTERNS for f in glob.glob(os.path.join(path, pattern))
      )
      if files:
        found[entry] = files
    elif entry.endswith((".parquet", ".jsonl")):
      found[os.path.splitext(entry)[0]] = [path]
  if tasks:
    missing = [t for t in tasks if t not in found]
    if missing:
      raise records.SchemaError(
          f"MMEB subsets {missing} not found in {src} " f"(found: {sorted(found) or 'none'})"
      )
    found = {t: found[t] for t in tasks}
  if not found:
    raise records.SchemaError(f"no MMEB subsets (<subset>/*.parquet or <subset>.jsonl) in {src}")
  return found


def _read_mmeb_rows(path: str):
  """(row id, row) pairs of one MMEB data file; unparsable JSONL lines come as BadRecords."""
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise records.SchemaError(
          f"{path}: reading parquet needs pyarrow; install it or convert the " "subset to JSONL"
      ) from e
    return [(f"row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
  if path.endswith(".jsonl"):
    return [(f"line {n}", row) for n, row in records.iter_jsonl(path, "MMEB subset")]
  rows = records.load_json(path, list, "MMEB list of rows")
  return [(f"row {i}", row) for i, row in enumerate(rows)]


def _mmeb_text(value) -> str:
  """MMEB text without the model-specific image placeholder tokens."""
  return MMEB_IMAGE_TOKEN.sub("", value or "").strip()


def plan_mmeb(
    src: str,
    *,
    split: str = "test",
    tasks: tuple = (),
    images: str | None = None,
    problems: records.ProblemLog,
) -> ImportPlan:
  """MMEB (VLM2Vec evaluation sets): rows of ``qry_text``, ``qry_img_path``, ``tgt_text`` (list),
  ``tgt_img_path`` (list), the first target being the correct one.

  Each subset (a folder of parquet/JSONL files or a ``<subset>.jsonl`` under ``src``; all of them
  when ``tasks`` is empty) is a task and a pool. Identical targets (same text and image path)
  within a subset become one candidate ``<subset>:c<n>``; query ``<subset>:q<n>`` lists its own
  targets in ``candidate_ids`` and the first in ``positive_ids``. ``<|image_k|>`` placeholders are
  removed from texts; a record's modality follows from which of text and image it has. Image paths
  are relative to ``images`` (default ``src``).
  """
  subset_files = _mmeb_subset_files(src, tuple(tasks))
  reader = records.ImageReader(records.require_dir(images or src, "MMEB image root"))
  queries_split = f"{split}_queries"
  written = _WrittenCandidates()

  # Rows are read once up front (texts and paths only) to give identical targets one id.
  candidate_ids = {}  # subset -> {(text, image path): candidate id}
  query_rows = []  # (subset, query id, source file, row problem or (text, image path, target ids))
  for subset, files in subset_files.items():
    rows = [(path, row_id, row) for path in files for row_id, row in _read_mmeb_rows(path)]
    for index, (path, row_id, row) in enumerate(rows):
      query_id = f"{subset}:q{index}"
      query_rows.append(
          (
              subset,
              query_id,
              path,
              _parse_mmeb_row(
                  row, row_id, query_id, path, subset, candidate_ids.setdefault(subset, {})
              ),
          )
      )

  def candidates():
    for subset, text, image_path, candidate_id in (
        (subset, *key, candidate_id)
        for subset, ids in candidate_ids.items()
        for key, candidate_id in ids.items()
    ):

      def build(subset=subset, text=text, image_path=image_path, candidate_id=candidate_id):
        source = ", ".join(subset_files[subset])
        image = reader.read(image_path, candidate_id, source) if image_path else b""
        return {
            "id": candidate_id,
            "image": image,
            "text": text,
            "modality": records.modality_of(bool(image_path), bool(text)),
            "pool": subset,
        }

      yield candidate_id, ", ".join(subset_files[subset]), build

  def queries():
    written.check_complete()
    for subset, query_id, path, parsed in query_rows:

      def build(subset=subset, query_id=query_id, path=path, parsed=parsed):
        if isinstance(parsed, BadRecord):
          raise parsed
        text, image_path, targets = parsed
        if targets[0] not in written.ids:
          raise BadRecord(
              "positive_not_in_pool",
              query_id,
              path,
              f"the correct target {targets[0]!r} was not written",
          )
        image = reader.read(image_path, query_id, path) if image_path else b""
        kept = [t for t in targets if t in written.ids]
        _report_dropped(
            [t for t in targets if t not in written.ids],
            problems,
            queries_split,
            query_id,
            path,
            "candidate_dropped",
        )
        return {
            "id": query_id,
            "image": image,
            "text": text,
            "pool": subset,
            "task": subset,
            "modality": records.modality_of(bool(image_path), bool(text)),
            "positive_ids": kept[:1],
            "candidate_ids": kept,
        }

      yield query_id, path, build

  return _retrieval_plan(
      f"MMEB {split} imported from {src} (subsets: {', '.join(subset_files)})",
      split,
      written.wrap(candidates),
      queries,
  )


def _parse_mmeb_row(row, row_id, query_id, path, subset, candidate_ids):
  """(query text, query image path, target candidate ids) of one row, or its BadRecord.

  ``candidate_ids`` maps the subset's (text, image path) targets to ids; new targets are added.
  """
  if isinstance(row, BadRecord):
    return BadRecord(row.reason, query_id, path, f"{row_id}: {row.detail}")
  if not isinstance(row, dict):
    return BadRecord("invalid_record", query_id, path, f"{row_id}: expected an object")
  try:
    text = _mmeb_text(
        records.get_field(row, "qry_text", query_id, path)
        if row.get("qry_text") is not None
        else ""
    )
    image_path = row.get("qry_img_path") or ""
    if not text and not image_path:
      raise BadRecord(
          "missing_field", query_id, path, "neither 'qry_text' nor 'qry_img_path' is set"
      )
    target_texts = records.get_field(row, "tgt_text", query_id, path, kind=list)
    target_images = row.get("tgt_img_path") or [""] * len(target_texts)
    if not isinstance(target_images, list) or len(target_images) != len(target_texts):
      raise BadRecord(
          "bad_field", query_id, path, "'tgt_img_path' must list one path per 'tgt_text'"
      )
    if not target_texts:
      raise BadRecord("missing_field", query_id, path, "'tgt_text' is empty")
  except BadRecord as problem:
    return BadRecord(problem.reason, query_id, path, f"{row_id}: {problem.detail}")
  targets = []
  for target_text, target_image in zip(target_texts, target_images):
    key = (_mmeb_text(target_text if isinstance(target_text, str) else ""), target_image or "")
    if not any(key):
      return BadRecord(
          "missing_field", query_id, path, f"{row_id}: a target has no text and no image"
      )
    targets.append(candidate_ids.setdefault(key, f"{subset}:c{len(candidate_ids)}"))
  return text, image_path, targets
