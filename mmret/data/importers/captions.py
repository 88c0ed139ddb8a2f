"""Image-caption formats: COCO captions, Karpathy split JSON and LCS-558K.

They become PAIRS splits (one record per caption: ``id``, ``image``, ``caption``) and CAPTION5
splits (one record per image: ``id``, ``image``, ``captions``, the first ``captions_per_image``
non-empty captions in file order; an image with fewer is skipped as 'too_few_captions').

Ids: a pair's id is its caption's own id where the format has one (COCO annotation ``id``,
Karpathy ``sentid``, LCS-558K ``id``), else ``<image id>#<caption index>``; a CAPTION5 record's id
is the image id (COCO ``id``, Karpathy ``imgid``, else the file name).

Vocabulary: an import with a PAIRS split stores the word vocabulary of its training captions in
the dataset's metadata (``metadata['vocab']``, :func:`caption_vocab`), which the ``'dataset'``
tokenizer reads, so a recipe trains on the import without a tokenizer file.
"""

import dataclasses
import glob
import os

from mmret.data import tokenizers
from mmret.data.importers import records
from mmret.data.importers import schema
from mmret.data.importers.records import BadRecord
from mmret.data.importers.writer import ImportPlan

KARPATHY_SPLITS = ("train", "val", "test")
# Karpathy's own split names -> the split they are written to ('restval' trains, as is customary).
KARPATHY_SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}
LCS_ANNOTATIONS_FILE = "blip_laion_cc_sbu_558k.json"
# Words kept in a dataset's vocabulary (specials included): the most frequent ones; rarer words
# map to <unk>.
VOCAB_MAX_SIZE = 32768


def caption_vocab(captions) -> list:
  """The word vocabulary of training ``captions`` (``tokenizers.build_word_vocab``: lower-cased
  words and punctuation marks, most frequent first, at most ``VOCAB_MAX_SIZE`` tokens). Values
  that are not text (a record the import will skip) are left out."""
  texts = (c for c in captions if isinstance(c, str))
  return tokenizers.build_word_vocab(texts, max_size=VOCAB_MAX_SIZE)


def _vocab_metadata(images: list) -> dict:
  """``info.metadata`` fields of an import training on ``images``' captions."""
  return {"vocab": caption_vocab(c for image in images for _, c in image.captions)}


@dataclasses.dataclass
class _Image:
  """A source image with its captions, as read from the annotation file."""

  image_id: str
  path: str  # relative to the image root
  captions: list  # (caption id or None, raw caption value) in file order
  source: str  # annotation file
  problem: BadRecord | None = None  # set when the image's own entry is unusable


def _image_problem(image: _Image, record_id: str) -> BadRecord:
  """The image entry's problem, reported for the record ``record_id`` built from it."""
  return BadRecord(image.problem.reason, record_id, image.source, image.problem.detail)


def _pairs_source(images: list, reader: records.ImageReader):
  """Record source of a PAIRS split: one record per caption of ``images``."""

  def source():
    for image in images:
      for index, (caption_id, caption) in enumerate(image.captions):
        record_id = caption_id if caption_id is not None else f"{image.image_id}#{index}"

        def build(image=image, caption=caption, record_id=record_id):
          if image.problem:
            raise _image_problem(image, record_id)
          if not isinstance(caption, str):
            raise BadRecord(
                "missing_field", record_id, image.source, "caption is missing or not text"
            )
          text = records.clean_text(caption, "caption", record_id, image.source)
          return {
              "id": record_id,
              "image": reader.read(image.path, record_id, image.source),
              "caption": text,
          }

        yield record_id, image.source, build

  return source


def _caption5_source(images: list, reader: records.ImageReader, captions_per_image: int):
  """Record source of a CAPTION5 split: one record per image with its first captions."""

  def source():
    for image in images:

      def build(image=image):
        if image.problem:
          raise _image_problem(image, image.image_id)
        texts = [c.strip() for _, c in image.captions if isinstance(c, str) and c.strip()]
        if len(texts) < captions_per_image:
          raise BadRecord(
              "too_few_captions",
              image.image_id,
              image.source,
              f"{len(texts)} non-empty captions, {captions_per_image} needed",
          )
        image_bytes = reader.read(image.path, image.image_id, image.source)
        return {"id": image.image_id, "image": image_bytes, "captions": texts[:captions_per_image]}

      yield image.image_id, image.source, build

  return source


def _bad_entry_source(bad_entries: list):
  """Record source that reports entries found unusable while reading the annotation file."""

  def source():
    for problem in bad_entries:

      def build(problem=problem):
        raise problem

      yield problem.record_id, problem.source, build

  return source


def _chain(*sources):

  def source():
    for s in sources:
      yield from s()

  return source


def plan_coco(
    src: str,
    *,
    split: str = "train2017",
    annotations: str | None = None,
    images: str | None = None,
    outputs: tuple = ("pairs", "caption5"),
    captions_per_image: int = 5,
) -> ImportPlan:
  """COCO captions (``annotations/captions_<split>.json`` + ``<split>/`` images under ``src``).

  Writes PAIRS split ``<split>`` and CAPTION5 split ``<split>_caption5`` (``outputs`` picks which:
  the PAIRS split stores each image once per caption); with the PAIRS split, the word vocabulary
  of its captions.
  """
  annotations = annotations or os.path.join(src, "annotations", f"captions_{split}.json")
  image_root = records.require_dir(images or os.path.join(src, split), "COCO image folder")
  content = records.load_json(
      annotations, dict, "COCO captions file with 'images' and 'annotations'"
  )
  for key in ("images", "annotations"):
    if not isinstance(content.get(key), list):
      raise records.SchemaError(f"{annotations}: COCO captions file needs a list under {key!r}")

  by_id, bad_entries = {}, []  # bad_entries: image entries without a usable id
  for index, entry in enumerate(content["images"]):
    try:
      image_id = records.get_field(entry, "id", f"images[{index}]", annotations)
    except BadRecord as problem:
      bad_entries.append(problem)
      continue
    if image_id in by_id:  # named by position: the id itself belongs to the first entry
      bad_entries.append(
          BadRecord(
              "duplicate_id",
              f"images[{index}]",
              annotations,
              f"image id {image_id!r} is listed twice under 'images'",
          )
      )
      continue
    image = by_id[image_id] = _Image(image_id, "", [], annotations)
    try:
      image.path = records.get_field(entry, "file_name", image_id, annotations)
    except BadRecord as problem:
      image.problem = problem

  bad_annotations = []
  for index, annotation in enumerate(content["annotations"]):
    record_id = f"annotations[{index}]"
    try:
      image_id = records.get_field(annotation, "image_id", record_id, annotations)
    except BadRecord as problem:
      bad_annotations.append(problem)
      continue
    caption_id = str(annotation["id"]) if annotation.get("id") is not None else None
    if image_id not in by_id:
      bad_annotations.append(
          BadRecord(
              "unknown_image",
              caption_id or record_id,
              annotations,
              f"image_id {image_id!r} is not listed under 'images'",
          )
      )
      continue
    by_id[image_id].captions.append((caption_id, annotation.get("caption")))

  images_in_order = list(by_id.values())
  reader = records.ImageReader(image_root)
  schemas, sources = {}, {}
  if "pairs" in outputs:
    schemas[split] = schema.pairs_features()
    sources[split] = _chain(
        _bad_entry_source(bad_entries + bad_annotations), _pairs_source(images_in_order, reader)
    )
  if "caption5" in outputs:
    schemas[f"{split}_caption5"] = schema.caption5_features()
    sources[f"{split}_caption5"] = _chain(
        _bad_entry_source(bad_entries),
        _caption5_source(images_in_order, reader, captions_per_image),
    )
  if not sources:
    raise ValueError(f"outputs must name 'pairs' and/or 'caption5', got {outputs!r}")
  metadata = _vocab_metadata(images_in_order) if "pairs" in outputs else {}
  return ImportPlan(f"COCO captions imported from {annotations}", schemas, sources, metadata)


def _find_karpathy_file(src: str) -> str:
  found = sorted(glob.glob(os.path.join(src, "dataset_*.json")))
  if len(found) != 1:
    raise records.SchemaError(
        f"expected exactly one Karpathy split file dataset_*.json in {src}, found "
        f"{[os.path.basename(f) for f in found] or 'none'}; pass annotations= (--annotations)"
    )
  return found[0]


def plan_karpathy(
    src: str,
    *,
    split: str = "train,val,test",
    annotations: str | None = None,
    images: str | None = None,
    captions_per_image: int = 5,
) -> ImportPlan:
  """Karpathy split JSON (``dataset_{coco,flickr30k,flickr8k}.json``) + image root.

  Writes PAIRS ``train`` (Karpathy train + restval) and CAPTION5 ``val`` / ``test``; ``split`` is a
  comma-separated subset of those. With ``train``, the word vocabulary of its captions. Image paths are ``<root>/<filepath>/<filename>`` (``filepath``
  only in the COCO file); the root is ``images`` or ``src``.
  """
  wanted = [s.strip() for s in split.split(",") if s.strip()]
  unknown = sorted(set(wanted) - set(KARPATHY_SPLITS))
  if unknown or not wanted:
    raise ValueError(f"Karpathy splits must be among {KARPATHY_SPLITS}, got {split!r}")
  annotations = annotations or _find_karpathy_file(src)
  image_root = records.require_dir(images or src, "Karpathy image root")
  content = records.load_json(annotations, dict, "Karpathy split file with an 'images' list")
  if not isinstance(content.get("images"), list):
    raise records.SchemaError(f"{annotations}: Karpathy split file needs a list under 'images'")

  per_split = {s: [] for s in KARPATHY_SPLITS}
  unplaced = []  # entries whose split or file name is unusable: reported in every written split
  for index, entry in enumerate(content["images"]):
    try:
      file_name = records.get_field(entry, "filename", f"images[{index}]", annotations)
      image_id = (
          records.get_field(entry, "imgid", file_name, annotations)
          if entry.get("imgid") is not None
          else file_name
      )
      source_split = records.get_field(entry, "split", image_id, annotations)
    except BadRecord as problem:
      unplaced.append(problem)
      continue
    if source_split not in KARPATHY_SPLIT_OF:
      continue  # not a split mmret writes
    image = _Image(image_id, os.path.join(entry.get("filepath") or "", file_name), [], annotations)
    try:
      sentences = records.get_field(entry, "sentences", image_id, annotations, kind=list)
      image.captions = [
          (
              (str(s["sentid"]) if isinstance(s, dict) and s.get("sentid") is not None else None),
              (s.get("raw") if isinstance(s, dict) else None),
          )
          for s in sentences
      ]
    except BadRecord as problem:
      image.problem = problem
      image.captions = [(None, None)]  # one PAIRS record carries the problem
    per_split[KARPATHY_SPLIT_OF[source_split]].append(image)

  reader = records.ImageReader(image_root)
  schemas, sources = {}, {}
  for name in wanted:
    if name == "train":
      schemas[name] = schema.pairs_features()
      images_source = _pairs_source(per_split[name], reader)
    else:
      schemas[name] = schema.caption5_features()
      images_source = _caption5_source(per_split[name], reader, captions_per_image)
    sources[name] = _chain(_bad_entry_source(unplaced), images_source)
  metadata = _vocab_metadata(per_split["train"]) if "train" in wanted else {}
  return ImportPlan(f"Karpathy split imported from {annotations}", schemas, sources, metadata)


def plan_lcs558k(
    src: str, *, split: str = "train", annotations: str | None = None, images: str | None = None
) -> ImportPlan:
  """LCS-558K (LLaVA pretraining captions): a JSON list of ``{"id", "image", "conversations"}``.

  The caption is the first ``{"from": "gpt"}`` turn's ``value``. Defaults: annotations
  ``<src>/blip_laion_cc_sbu_558k.json``, images ``<src>/images`` if present, else ``src``.
  Writes PAIRS split ``split`` and the word vocabulary of its captions.
  """
  annotations = annotations or os.path.join(src, LCS_ANNOTATIONS_FILE)
  if images is None:
    images = os.path.join(src, "images") if os.path.isdir(os.path.join(src, "images")) else src
  image_root = records.require_dir(images, "LCS-558K image root")
  entries = records.load_json(annotations, list, "LCS-558K list of conversations")
  reader = records.ImageReader(image_root)

  def first_answer(entry):
    """The caption of an entry: its first turn from 'gpt' (None when there is none)."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    for turn in turns if isinstance(turns, list) else ():
      if isinstance(turn, dict) and turn.get("from") == "gpt":
        return turn.get("value")
    return None

  def source():
    for index, entry in enumerate(entries):
      record_id = (
          str(entry["id"])
          if isinstance(entry, dict) and entry.get("id") is not None
          else f"entry {index}"
      )

      def build(entry=entry, record_id=record_id):
        records.get_field(entry, "id", record_id, annotations)
        image_path = records.get_field(entry, "image", record_id, annotations)
        records.get_field(entry, "conversations", record_id, annotations, kind=list)
        answer = first_answer(entry)
        if not isinstance(answer, str):
          raise BadRecord(
              "missing_field",
              record_id,
              annotations,
              "no conversation turn from 'gpt' with a text 'value'",
          )
        caption = records.clean_text(answer, "caption", record_id, annotations)
        return {
            "id": record_id,
            "image": reader.read(image_path, record_id, annotations),
            "caption": caption,
        }

      yield record_id, annotations, build

  return ImportPlan(
      f"LCS-558K captions imported from {annotations}",
      {split: schema.pairs_features()},
      {split: source},
      {"vocab": caption_vocab(first_answer(entry) for entry in entries)},
  )
