r"""Imports a real dataset into an mmret tfds ArrayRecord dataset.

  python -m mmret.prepare --format=FORMAT --src=DIR --out=DIR [--split=...] \
      [--on_error=skip|fail] [--overwrite]

The output directory is a complete tfds dataset, read with
``tfds.builder_from_directory(OUT).as_data_source(SPLIT)``, plus ``import_summary.json`` (records
written and skipped per split, per-reason counts, the first offending ids and files). It appears
only once the import has finished; a dataset already there is kept unless ``--overwrite``.
``--out`` may be a URL (``gs://bucket/mmret/flickr30k``): the dataset is generated in a local
temporary directory and copied there (see ``mmret.data.importers.writer``).
Bad records (missing or corrupt image, empty caption, missing field, duplicate id) are skipped and
counted, or with ``--on_error=fail`` stop the import with an error naming the file and record.
Progress goes to stderr: per split, the records done of those counted in a first pass over the
annotations, their rate and an ETA (every 20 s), then a line with the split's totals.

COCO captions (``annotations/captions_val2017.json`` and ``val2017/`` under ``--src``) ->
PAIRS ``val2017`` (one record per caption) and CAPTION5 ``val2017_caption5`` (first 5 per image)::

  python -m mmret.prepare --format=coco --src=/data/coco --split=val2017 \
      --out=/data/mmret/coco_val2017

Karpathy split JSON (``dataset_coco.json`` / ``dataset_flickr30k.json``) -> PAIRS ``train``
(train + restval) and CAPTION5 ``val``, ``test``; ``--src`` is the image root::

  python -m mmret.prepare --format=karpathy --src=/data/flickr30k/flickr30k-images \
      --annotations=/data/flickr30k/dataset_flickr30k.json --split=test --out=/data/mmret/flickr30k

LCS-558K (``blip_laion_cc_sbu_558k.json`` and ``images/`` under ``--src``) -> PAIRS ``train``::

  python -m mmret.prepare --format=lcs558k --src=/data/LLaVA-Pretrain --out=/data/mmret/lcs558k

M-BEIR (UniIR layout: ``query/``, ``cand_pool/local/``, ``qrels/``, ``instructions/``,
``mbeir_images/`` under ``--src``) -> RETRIEVAL ``test_candidates`` / ``test_queries``, one pool per
task (all tasks of the split unless ``--tasks``)::

  python -m mmret.prepare --format=mbeir --src=/data/M-BEIR --split=test \
      --tasks=mscoco_task0,mscoco_task3,cirr_task7 --out=/data/mmret/mbeir_test

MMEB (one folder of parquet/JSONL rows per subset under ``--src``; images under ``--images``) ->
RETRIEVAL ``test_candidates`` / ``test_queries`` with each query's own ``candidate_ids``::

  python -m mmret.prepare --format=mmeb --src=/data/MMEB-eval --images=/data/MMEB-eval/eval_images \
      --tasks=ImageNet-1K,MSCOCO_t2i --out=/data/mmret/mmeb

CoVR (a WebVid-CoVR / CC-CoVR annotation CSV; ``--src`` is the frames root holding one folder of
frame images per video, ``<src>/<pth1 or pth2>/``) -> ``test_candidates`` (the distinct target
videos) / ``test_queries`` (reference frames, modification text, target id), ``--num_frames``
frames sampled uniformly per video (default 4); ``--columns`` renames the CSV columns
(defaults reference=pth1,edit=edit,target=pth2)::

  python -m mmret.prepare --format=covr --src=/data/WebVid/8M/test_frames \
      --annotations=/data/CoVR/annotation/webvid-covr/webvid8m-covr_test.csv \
      --out=/data/mmret/webvid_covr_test
"""

import argparse
import json
import sys

from absl import logging

from mmret import runtime
from mmret.data import importers
from mmret.data.importers import records


def _comma_list(value: str) -> tuple:
  return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m mmret.prepare",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--format", required=True, choices=importers.FORMATS, help="source format")
  parser.add_argument(
      "--src", required=True, help="source folder (layout per format: see the examples above)"
  )
  parser.add_argument(
      "--out", required=True, help="dataset directory to create (local path or gs://...)"
  )
  parser.add_argument(
      "--split",
      help="split to import / output split name (default per format: "
      "coco train2017, karpathy train,val,test, lcs558k train, mbeir/mmeb/covr test)",
  )
  parser.add_argument(
      "--on_error",
      choices=records.ON_ERROR_CHOICES,
      default="skip",
      help="skip and count bad records, or fail on the first one",
  )
  parser.add_argument(
      "--overwrite", action="store_true", help="replace an existing dataset at --out"
  )
  parser.add_argument(
      "--max_pixels",
      type=int,
      default=records.DEFAULT_MAX_PIXELS,
      help="skip images with more pixels than this (default 40 megapixels), before decoding",
  )
  parser.add_argument(
      "--annotations", help="coco/karpathy/lcs558k/covr: annotation file (default per format)"
  )
  parser.add_argument(
      "--images", help="coco/karpathy/lcs558k/mmeb: image root (default per format)"
  )
  parser.add_argument("--tasks", type=_comma_list, help="mbeir/mmeb: comma-separated tasks/subsets")
  parser.add_argument("--outputs", type=_comma_list, help="coco: pairs,caption5 (default both)")
  parser.add_argument(
      "--captions_per_image",
      type=int,
      help="coco/karpathy: captions per CAPTION5 " "record (default 5)",
  )
  parser.add_argument(
      "--qrels",
      action=argparse.BooleanOptionalAction,
      default=None,
      help="mbeir: positives from the qrels files when present (default on)",
  )
  parser.add_argument(
      "--instructions",
      action=argparse.BooleanOptionalAction,
      default=None,
      help="mbeir: instructions from query_instructions.tsv when present " "(default on)",
  )
  parser.add_argument("--num_frames", type=int, help="covr: frames sampled per video (default 4)")
  parser.add_argument(
      "--columns",
      type=_comma_list,
      help="covr: CSV columns as role=name,... (roles reference, edit, target; "
      "default reference=pth1,edit=edit,target=pth2)",
  )
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  # Progress lines (records done, rate, ETA per split) go to stderr through absl logging.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  runtime.setup_logging()
  options = {
      k: getattr(args, k)
      for k in (
          "split",
          "annotations",
          "images",
          "tasks",
          "outputs",
          "captions_per_image",
          "qrels",
          "instructions",
          "num_frames",
          "columns",
      )
  }
  try:
    summary = importers.import_dataset(
        args.format,
        args.src,
        args.out,
        on_error=args.on_error,
        overwrite=args.overwrite,
        max_pixels=args.max_pixels,
        **options,
    )
  except (
      importers.SchemaError,
      importers.RecordError,
      importers.EmptySplitError,
      FileExistsError,
      ValueError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(records.format_summary(summary))
  print(f"wrote {args.out} ({json.dumps({s: v['written'] for s, v in summary['splits'].items()})})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
