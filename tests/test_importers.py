"""Importers: each format round-trips through a tfds ArrayRecord dataset; bad input is reported."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmret import prepare
from mmret.data import importers
from mmret.data.importers import records
from mmret.data.importers import schema
from mmret.data.importers import writer

# ----------------------------------------------------------------------------------------------
# Fixture helpers: real encoded image files and dataset read-back.


def _write_image(path, seed, fmt="PNG"):
  """Writes a small random image and returns the pixels a decoder reads back from the file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, size=(6 + seed % 3, 8, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)
  return _pixels(open(path, "rb").read())


def _pixels(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def _write_json(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(content, f)


def _write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def _text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _read_split(out, split) -> dict:
  """id -> record (texts as str) of one split, read the way mmret reads datasets."""
  source = tfds.builder_from_directory(out).as_data_source(split)
  result = {}
  for index in range(len(source)):
    record = dict(source[index])
    for key, value in record.items():
      if isinstance(value, (list, np.ndarray)) and key.endswith(("ids", "captions")):
        record[key] = [_text(v) for v in value]
      elif key != "image":
        record[key] = _text(value)
    result[record["id"]] = record
  return result


def _split_order(out, split) -> list:
  source = tfds.builder_from_directory(out).as_data_source(split)
  return [_text(source[i]["id"]) for i in range(len(source))]


def _summary(out) -> dict:
  with open(os.path.join(out, writer.SUMMARY_FILE)) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------
# COCO


def _coco_fixture(root, n_images=3, captions_per_image=6):
  """COCO layout; image i is PNG except image 1 (JPEG); returns image id -> pixels."""
  pixels, images, annotations = {}, [], []
  for i in range(n_images):
    image_id = 100 + i
    fmt, ext = ("JPEG", "jpg") if i == 1 else ("PNG", "png")
    file_name = f"{image_id:012d}.{ext}"
    pixels[str(image_id)] = _write_image(os.path.join(root, "val2017", file_name), i, fmt)
    images.append({"id": image_id, "file_name": file_name, "height": 6, "width": 8})
    for k in range(captions_per_image):
      annotations.append(
          {"id": 1000 + 10 * i + k, "image_id": image_id, "caption": f" image {i} caption {k} "}
      )
  _write_json(
      os.path.join(root, "annotations", "captions_val2017.json"),
      {"info": {}, "images": images, "annotations": annotations},
  )
  return pixels


def _coco_file(root):
  return os.path.join(root, "annotations", "captions_val2017.json")


def _edit_coco(root, edit):
  path = _coco_file(root)
  with open(path) as f:
    content = json.load(f)
  edit(content)
  _write_json(path, content)


def test_coco_round_trip(tmp_path):
  src, out = str(tmp_path / "coco"), str(tmp_path / "out")
  pixels = _coco_fixture(src)
  summary = importers.import_dataset("coco", src, out, split="val2017")

  pairs = _read_split(out, "val2017")
  assert len(pairs) == 18
  assert _split_order(out, "val2017")[:7] == [
      "1000",
      "1001",
      "1002",
      "1003",
      "1004",
      "1005",
      "1010",
  ]  # source order
  assert pairs["1013"]["caption"] == "image 1 caption 3"  # stripped
  for record in pairs.values():
    image_id = str(100 + (int(record["id"]) - 1000) // 10)
    np.testing.assert_array_equal(_pixels(record["image"]), pixels[image_id])
  # JPEG bytes are stored as they are, not re-encoded.
  jpeg_path = os.path.join(src, "val2017", "000000000101.jpg")
  assert pairs["1010"]["image"] == open(jpeg_path, "rb").read()

  caption5 = _read_split(out, "val2017_caption5")
  assert sorted(caption5) == ["100", "101", "102"]
  assert caption5["102"]["captions"] == [f"image 2 caption {k}" for k in range(5)]  # first 5 of 6
  np.testing.assert_array_equal(_pixels(caption5["101"]["image"]), pixels["101"])

  assert summary["splits"]["val2017"] == {"written": 18, "skipped": 0, "problems": {}}
  saved = _summary(out)
  assert saved["format"] == "coco" and saved["splits"]["val2017_caption5"]["written"] == 3
  # Each split's own fields are recorded for readers (tfds holds one feature set per dataset).
  split_fields = {
      "val2017": ["caption", "id", "image"],
      "val2017_caption5": ["captions", "id", "image"],
  }
  assert saved["split_fields"] == split_fields
  assert tfds.builder_from_directory(out).info.metadata["split_fields"] == split_fields


def test_coco_outputs_pick_splits(tmp_path):
  src, out = str(tmp_path / "coco"), str(tmp_path / "out")
  _coco_fixture(src, n_images=2, captions_per_image=5)
  importers.import_dataset("coco", src, out, split="val2017", outputs=("caption5",))
  assert set(tfds.builder_from_directory(out).info.splits) == {"val2017_caption5"}


def _break_missing_image(root):
  os.remove(os.path.join(root, "val2017", "000000000100.png"))
  return "missing_image", "000000000100.png"


def _break_corrupt_image(root):
  with open(os.path.join(root, "val2017", "000000000100.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not really a png")
  return "corrupt_image", "000000000100.png"


def _break_truncated_jpeg(root):
  path = os.path.join(root, "val2017", "000000000101.jpg")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])  # the header parses; the full decode fails
  return "corrupt_image", "000000000101.jpg"


def _break_empty_caption(root):
  _edit_coco(root, lambda c: c["annotations"][2].update(caption="   "))
  return "empty_caption", "1002"


def _break_missing_field(root):
  _edit_coco(root, lambda c: c["annotations"][3].pop("image_id"))
  return "missing_field", "annotations[3]"


def _break_duplicate_id(root):
  _edit_coco(root, lambda c: c["annotations"][4].update(id=1000))
  return "duplicate_id", "1000"


BREAKAGES = [
    _break_missing_image,
    _break_corrupt_image,
    _break_truncated_jpeg,
    _break_empty_caption,
    _break_missing_field,
    _break_duplicate_id,
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__[len("_break_") :])
def test_coco_bad_record_fail_mode_names_file_and_record(tmp_path, breakage):
  src, out = str(tmp_path / "coco"), str(tmp_path / "out")
  _coco_fixture(src)
  reason, culprit = breakage(src)
  with pytest.raises(importers.RecordError) as error:
    importers.import_dataset("coco", src, out, split="val2017", on_error="fail")
  message = str(error.value)
  assert reason in message and culprit in message and "captions_val2017.json" in message
  assert not os.path.exists(out)
  assert os.listdir(tmp_path) == ["coco"]  # no staging directory left behind


def test_coco_bad_records_skipped_and_counted(tmp_path):
  src, out = str(tmp_path / "coco"), str(tmp_path / "out")
  _coco_fixture(src, n_images=4)
  for breakage in (
      _break_corrupt_image,
      _break_empty_caption,
      _break_missing_field,
      _break_duplicate_id,
  ):
    breakage(src)
  # Image 103 keeps only 4 captions: too few for CAPTION5, still fine as 4 pairs.
  _edit_coco(
      src,
      lambda c: c.update(
          annotations=[
              a for a in c["annotations"] if not (a.get("image_id") == 103 and a["id"] % 10 > 3)
          ]
      ),
  )
  summary = importers.import_dataset("coco", src, out, split="val2017")

  pairs = summary["splits"]["val2017"]
  # Image 100 (corrupt) lost its captions 0, 1, 5 (2 is empty, 3 lost its image_id, 4 is the
  # duplicate of 1000 and counted as such).
  assert pairs["problems"]["corrupt_image"]["count"] == 3
  assert pairs["problems"]["empty_caption"]["count"] == 1
  assert pairs["problems"]["missing_field"]["count"] == 1
  assert pairs["problems"]["duplicate_id"]["count"] == 1
  assert pairs["skipped"] == 6 and pairs["written"] == 6 + 6 + 4
  example = pairs["problems"]["corrupt_image"]["examples"][0]
  assert example["id"] == "1000" and "000000000100.png" in example["detail"]
  assert example["file"].endswith("captions_val2017.json")

  caption5 = summary["splits"]["val2017_caption5"]
  # Image 100 also has 4 usable captions left (the captions are checked before the image).
  assert [e["id"] for e in caption5["problems"]["too_few_captions"]["examples"]] == ["100", "103"]
  assert sorted(_read_split(out, "val2017_caption5")) == ["101", "102"]
  assert _summary(out)["total_skipped"] == summary["total_skipped"] == 8
  assert "1000" not in _read_split(out, "val2017")


def test_non_png_jpeg_images_are_reencoded_to_png(tmp_path):
  src, out = str(tmp_path / "coco"), str(tmp_path / "out")
  _coco_fixture(src, n_images=1, captions_per_image=5)
  bmp_pixels = _write_image(os.path.join(src, "val2017", "000000000100.png"), 7, "BMP")
  importers.import_dataset("coco", src, out, split="val2017")
  stored = _read_split(out, "val2017_caption5")["100"]["image"]
  assert stored.startswith(b"\x89PNG")
  np.testing.assert_array_equal(_pixels(stored), bmp_pixels)


def test_schema_errors_always_fail(tmp_path):
  src = str(tmp_path / "coco")
  _coco_fixture(src, n_images=1)
  with pytest.raises(importers.SchemaError, match="captions_train2017.json"):
    importers.import_dataset(
        "coco", src, str(tmp_path / "o1"), split="train2017", images=os.path.join(src, "val2017")
    )
  _write_json(_coco_file(src), [{"id": 1}])
  with pytest.raises(importers.SchemaError, match="top-level JSON must be a dict"):
    importers.import_dataset("coco", src, str(tmp_path / "o2"), split="val2017")
  _write_json(_coco_file(src), {"images": []})
  with pytest.raises(importers.SchemaError, match="'annotations'"):
    importers.import_dataset("coco", src, str(tmp_path / "o3"), split="val2017")
  with open(_coco_file(src), "w") as f:
    f.write("{not json")
  with pytest.raises(importers.SchemaError, match="not valid JSON"):
    importers.import_dataset("coco", src, str(tmp_path / "o4"), split="val2017")
  with pytest.raises(importers.SchemaError, match="source folder not found"):
    importers.import_dataset("lcs558k", str(tmp_path / "nowhere"), str(tmp_path / "o5"))
  lcs = str(tmp_path / "lcs")
  _write_json(os.path.join(lcs, "blip_laion_cc_sbu_558k.json"), {"id": "x"})
  with pytest.raises(importers.SchemaError, match="must be a list"):
    importers.import_dataset("lcs558k", lcs, str(tmp_path / "o6"))
  with pytest.raises(importers.SchemaError, match="query"):
    importers.import_dataset("mbeir", lcs, str(tmp_path / "o7"))
  with pytest.raises(ValueError, match="do not apply"):
    importers.import_dataset("lcs558k", lcs, str(tmp_path / "o8"), tasks=("a",))
  assert sorted(os.listdir(tmp_path)) == ["coco", "lcs"]


def test_every_record_bad_is_an_empty_split_error(tmp_path):
  src, out = str(tmp_path / "coco"), str(tmp_path / "out")
  _coco_fixture(src, n_images=1)
  _break_missing_image(src)
  with pytest.raises(importers.EmptySplitError, match="missing_image"):
    importers.import_dataset("coco", src, out, split="val2017")
  assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------
# Atomicity and overwrite


def test_interrupted_import_leaves_no_dataset(tmp_path, monkeypatch):
  src, out = str(tmp_path / "coco"), str(tmp_path / "out")
  _coco_fixture(src)
  real_read = records.ImageReader.read
  calls = []

  def failing_read(self, *args):
    calls.append(1)
    if len(calls) == 10:  # mid-way through the first split
      raise KeyboardInterrupt
    return real_read(self, *args)

  monkeypatch.setattr(records.ImageReader, "read", failing_read)
  with pytest.raises(KeyboardInterrupt):
    importers.import_dataset("coco", src, out, split="val2017")
  assert not os.path.exists(out)
  assert os.listdir(tmp_path) == ["coco"]


def test_existing_dataset_is_kept_unless_overwrite(tmp_path, monkeypatch):
  src, out = str(tmp_path / "coco"), str(tmp_path / "out")
  _coco_fixture(src, n_images=2)
  importers.import_dataset("coco", src, out, split="val2017")
  with pytest.raises(FileExistsError, match="--overwrite"):
    importers.import_dataset("coco", src, out, split="val2017")

  # A failing re-import with overwrite leaves the old dataset intact.
  _edit_coco(src, lambda c: c["annotations"].append({"id": 5, "image_id": 100, "caption": "new"}))

  def broken_disk(*args):
    raise OSError("disk")

  monkeypatch.setattr(records.ImageReader, "read", broken_disk)
  with pytest.raises(OSError, match="disk"):
    importers.import_dataset("coco", src, out, split="val2017", overwrite=True)
  assert len(_read_split(out, "val2017")) == 12
  monkeypatch.undo()

  importers.import_dataset("coco", src, out, split="val2017", overwrite=True)
  assert len(_read_split(out, "val2017")) == 13
  assert sorted(os.listdir(tmp_path)) == ["coco", "out"]

  (tmp_path / "not_a_dataset").mkdir()
  (tmp_path / "not_a_dataset" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="holds no dataset"):
    importers.import_dataset(
        "coco", src, str(tmp_path / "not_a_dataset"), split="val2017", overwrite=True
    )
  assert (tmp_path / "not_a_dataset" / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# Karpathy


def test_karpathy_round_trip(tmp_path):
  root, out = str(tmp_path / "coco2014"), str(tmp_path / "out")
  entries, pixels = [], {}
  layout = [
      ("train", "train2014"),
      ("restval", "val2014"),
      ("val", "val2014"),
      ("test", "val2014"),
      ("test", "val2014"),
  ]
  for i, (split, folder) in enumerate(layout):
    file_name = f"COCO_{folder}_{i:012d}.jpg" if i % 2 else f"COCO_{folder}_{i:012d}.png"
    fmt = "JPEG" if i % 2 else "PNG"
    pixels[str(i)] = _write_image(os.path.join(root, folder, file_name), i, fmt)
    sentences = [
        {"raw": f"Photo {i} sentence {k}.", "tokens": [], "imgid": i, "sentid": 10 * i + k}
        for k in range(5)
    ]
    entries.append(
        {
            "filepath": folder,
            "filename": file_name,
            "imgid": i,
            "split": split,
            "sentences": sentences,
            "cocoid": 500 + i,
        }
    )
  entries[4]["sentences"][1]["raw"] = ""  # test image 4 has 4 usable captions only
  _write_json(os.path.join(root, "dataset_coco.json"), {"images": entries, "dataset": "coco"})

  summary = importers.import_dataset("karpathy", root, out)
  train = _read_split(out, "train")
  assert sorted(train, key=int) == [str(s) for s in list(range(0, 5)) + list(range(10, 15))]
  assert train["12"]["caption"] == "Photo 1 sentence 2."
  np.testing.assert_array_equal(_pixels(train["12"]["image"]), pixels["1"])
  assert list(_read_split(out, "val")) == ["2"]
  test = _read_split(out, "test")
  assert list(test) == ["3"]
  assert test["3"]["captions"] == [f"Photo 3 sentence {k}." for k in range(5)]
  np.testing.assert_array_equal(_pixels(test["3"]["image"]), pixels["3"])
  assert summary["splits"]["test"]["problems"]["too_few_captions"]["examples"][0]["id"] == "4"

  out_test = str(tmp_path / "out_test")
  importers.import_dataset("karpathy", root, out_test, split="test")
  assert set(tfds.builder_from_directory(out_test).info.splits) == {"test"}
  with pytest.raises(ValueError, match="Karpathy splits"):
    importers.import_dataset("karpathy", root, str(tmp_path / "o"), split="restval")


def test_karpathy_flickr_layout_and_missing_image(tmp_path):
  images, out = str(tmp_path / "flickr30k-images"), str(tmp_path / "out")
  entries = []
  for i in range(2):
    _write_image(os.path.join(images, f"{i}.jpg"), i, "JPEG")
    entries.append(
        {
            "filename": f"{i}.jpg",
            "imgid": i,
            "split": "test",
            "sentences": [{"raw": f"s{k}", "sentid": 5 * i + k} for k in range(5)],
        }
    )
  entries.append(
      {
          "filename": "2.jpg",
          "imgid": 2,
          "split": "test",
          "sentences": [{"raw": f"t{k}"} for k in range(5)],
      }
  )
  annotations = str(tmp_path / "dataset_flickr30k.json")
  _write_json(annotations, {"images": entries})
  with pytest.raises(importers.SchemaError, match="dataset_"):
    importers.import_dataset("karpathy", images, out)  # no split file inside the image root
  summary = importers.import_dataset("karpathy", images, out, annotations=annotations, split="test")
  assert sorted(_read_split(out, "test")) == ["0", "1"]
  example = summary["splits"]["test"]["problems"]["missing_image"]["examples"][0]
  assert example["id"] == "2" and "2.jpg" in example["detail"]


# ----------------------------------------------------------------------------------------------
# LCS-558K


def test_lcs558k_round_trip_and_bad_records(tmp_path):
  root, out = str(tmp_path / "LLaVA-Pretrain"), str(tmp_path / "out")
  entries, pixels = [], {}
  for i in range(4):
    record_id = f"00453{i:04d}"
    path = f"00453/{record_id}.{'jpg' if i % 2 else 'png'}"
    pixels[record_id] = _write_image(
        os.path.join(root, "images", path), i, "JPEG" if i % 2 else "PNG"
    )
    entries.append(
        {
            "id": record_id,
            "image": path,
            "conversations": [
                {"from": "human", "value": "Give a brief description of the image.\n<image>"},
                {"from": "gpt", "value": f"a photo number {i}"},
            ],
        }
    )
  entries[3]["conversations"] = entries[3]["conversations"][:1]  # no caption
  entries.append({"image": "00453/004530000.png", "conversations": []})  # no id
  _write_json(os.path.join(root, "blip_laion_cc_sbu_558k.json"), entries)

  summary = importers.import_dataset("lcs558k", root, out)
  train = _read_split(out, "train")
  assert list(train) == ["004530000", "004530001", "004530002"]
  assert train["004530001"]["caption"] == "a photo number 1"
  for record_id, record in train.items():
    np.testing.assert_array_equal(_pixels(record["image"]), pixels[record_id])
  problems = summary["splits"]["train"]["problems"]
  assert problems["missing_field"]["count"] == 2
  assert {e["id"] for e in problems["missing_field"]["examples"]} == {"004530003", "entry 4"}

  with pytest.raises(importers.RecordError, match="004530003.*gpt"):
    importers.import_dataset("lcs558k", root, str(tmp_path / "o2"), on_error="fail")


# ----------------------------------------------------------------------------------------------
# M-BEIR


def _mbeir_fixture(root):
  """Two tasks: mscoco_task0 (text -> image, split-specific pool) and webqa_task2 (text ->
  image,text), plus an image,text -> text task; returns did -> pixels."""
  pixels = {}

  def image(name, seed):
    rel = f"mbeir_images/{name}"
    pixels[name] = _write_image(os.path.join(root, rel), seed, "JPEG" if seed % 2 else "PNG")
    return rel

  _write_jsonl(
      os.path.join(root, "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl"),
      [
          {
              "txt": None,
              "img_path": image("coco/a.jpg", 1),
              "modality": "image",
              "did": "9:1",
              "src_content": None,
          },
          {"txt": None, "img_path": image("coco/b.png", 2), "modality": "image", "did": "9:2"},
          {
              "txt": None,
              "img_path": "mbeir_images/coco/missing.png",
              "modality": "image",
              "did": "9:3",
          },
      ],
  )
  # A full (non-test) pool that must not be used when the split-specific one exists.
  _write_jsonl(
      os.path.join(root, "cand_pool/local/mbeir_mscoco_task0_cand_pool.jsonl"),
      [{"txt": None, "img_path": "x.png", "modality": "image", "did": "9:99"}],
  )
  _write_jsonl(
      os.path.join(root, "cand_pool/local/mbeir_webqa_task2_cand_pool.jsonl"),
      [
          {
              "txt": "A bridge.",
              "img_path": image("webqa/c.png", 4),
              "modality": "image,text",
              "did": "2:1",
          },
          {
              "txt": "A tower.",
              "img_path": image("webqa/d.jpg", 5),
              "modality": "image,text",
              "did": "2:2",
          },
          {"txt": "", "img_path": image("webqa/e.png", 6), "modality": "image,text", "did": "2:3"},
          {"txt": "Duplicate id.", "img_path": None, "modality": "text", "did": "9:1"},
      ],
  )
  _write_jsonl(
      os.path.join(root, "query/test/mbeir_mscoco_task0_test.jsonl"),
      [
          {
              "qid": "9:10",
              "query_txt": "A cat on a mat.",
              "query_img_path": None,
              "query_modality": "text",
              "query_src_content": None,
              "pos_cand_list": ["9:1"],
              "neg_cand_list": [],
              "task_id": 0,
          },
          {
              "qid": "9:11",
              "query_txt": "A dog.",
              "query_img_path": None,
              "query_modality": "text",
              "pos_cand_list": ["9:3"],
              "task_id": 0,
          },  # its only positive has no image file
          {
              "qid": "9:12",
              "query_txt": "Two cats.",
              "query_img_path": None,
              "query_modality": "text",
              "pos_cand_list": ["9:2", "9:3"],
              "task_id": 0,
          },  # keeps one of two positives
      ],
  )
  _write_jsonl(
      os.path.join(root, "query/test/mbeir_webqa_task2_test.jsonl"),
      [
          {
              "qid": "2:10",
              "query_txt": "Which bridge?",
              "query_img_path": None,
              "query_modality": "text",
              "pos_cand_list": ["2:1"],
              "task_id": 2,
          },
          {
              "qid": "2:11",
              "query_txt": "Same tower?",
              "query_img_path": image("webqa/q.png", 7),
              "query_modality": "image,text",
              "pos_cand_list": ["2:2"],
              "task_id": 2,
          },
          "{broken json",
      ],
  )
  # qrels override pos_cand_list where present: 2:10 -> 2:2 as well.
  os.makedirs(os.path.join(root, "qrels/test"))
  with open(os.path.join(root, "qrels/test/mbeir_webqa_task2_test_qrels.txt"), "w") as f:
    f.write("2:10 0 2:1 1 2\n2:10 0 2:2 1 2\n2:10 0 2:3 0 2\n2:11 0 2:2 1 2\n")
  os.makedirs(os.path.join(root, "instructions"), exist_ok=True)
  with open(os.path.join(root, "instructions/query_instructions.tsv"), "w") as f:
    f.write("query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\n")
    f.write(
        "text\timage\tMSCOCO\t9\tFind me an everyday image that matches the given caption.\t"
        "Second prompt.\n"
    )
    f.write("text\timage,text\tWebQA\t2\tFind a Wikipedia image that answers this question.\t\n")
  return pixels


def test_mbeir_round_trip(tmp_path):
  root, out = str(tmp_path / "M-BEIR"), str(tmp_path / "out")
  pixels = _mbeir_fixture(root)
  summary = importers.import_dataset("mbeir", root, out)

  candidates = _read_split(out, "test_candidates")
  assert list(candidates) == ["9:1", "9:2", "2:1", "2:2"]
  assert candidates["9:1"]["modality"] == "image" and candidates["9:1"]["text"] == ""
  assert candidates["9:1"]["pool"] == "mscoco_task0"
  np.testing.assert_array_equal(_pixels(candidates["9:1"]["image"]), pixels["coco/a.jpg"])
  assert candidates["2:2"]["text"] == "A tower." and candidates["2:2"]["pool"] == "webqa_task2"
  np.testing.assert_array_equal(_pixels(candidates["2:2"]["image"]), pixels["webqa/d.jpg"])
  problems = summary["splits"]["test_candidates"]["problems"]
  assert set(problems) == {"missing_image", "empty_text", "duplicate_id"}

  queries = _read_split(out, "test_queries")
  assert list(queries) == ["9:10", "9:12", "2:10", "2:11"]
  cat = queries["9:10"]
  assert (cat["text"], cat["modality"], cat["image"], cat["pool"], cat["task"]) == (
      "A cat on a mat.",
      "text",
      b"",
      "mscoco_task0",
      "mscoco_task0",
  )
  assert cat["positive_ids"] == ["9:1"] and cat["candidate_ids"] == []
  assert cat["instruction"] == "Find me an everyday image that matches the given caption."
  assert cat["negative_id"] == "" and cat["negative_kind"] == ""
  assert queries["9:12"]["positive_ids"] == ["9:2"]
  assert queries["2:10"]["positive_ids"] == ["2:1", "2:2"]  # from qrels
  assert queries["2:10"]["instruction"] == "Find a Wikipedia image that answers this question."
  assert queries["2:11"]["modality"] == "image,text" and queries["2:11"]["instruction"] == ""
  np.testing.assert_array_equal(_pixels(queries["2:11"]["image"]), pixels["webqa/q.png"])
  query_problems = summary["splits"]["test_queries"]
  assert query_problems["skipped"] == 2  # 9:11 and the broken line
  assert query_problems["problems"]["positive_not_in_pool"]["examples"][0]["id"] == "9:11"
  dropped = query_problems["problems"]["positive_dropped"]
  assert dropped["count"] == 1 and dropped["examples"][0]["id"] == "9:12"  # kept, lost 9:3
  assert query_problems["problems"]["invalid_json"]["examples"][0]["id"] == "line 3"

  only = str(tmp_path / "only")
  importers.import_dataset(
      "mbeir", root, only, tasks=("webqa_task2",), qrels=False, instructions=False
  )
  queries = _read_split(only, "test_queries")
  assert queries["2:10"]["positive_ids"] == ["2:1"] and queries["2:10"]["instruction"] == ""
  with pytest.raises(importers.SchemaError, match="mscoco_task9"):
    importers.import_dataset("mbeir", root, str(tmp_path / "o"), tasks=("mscoco_task9",))


def test_mbeir_fail_mode_names_pool_file_and_did(tmp_path):
  root = str(tmp_path / "M-BEIR")
  _mbeir_fixture(root)
  with pytest.raises(
      importers.RecordError, match=r"mbeir_mscoco_task0_test_cand_pool.jsonl.*'9:3'"
  ):
    importers.import_dataset("mbeir", root, str(tmp_path / "out"), on_error="fail")


# ----------------------------------------------------------------------------------------------
# MMEB


def test_mmeb_round_trip(tmp_path):
  root, images = str(tmp_path / "MMEB-eval"), str(tmp_path / "eval_images")
  out = str(tmp_path / "out")
  pixels = {}
  for name, seed in [("VOC/q0.jpg", 1), ("VOC/q1.png", 2), ("T2I/c0.png", 3), ("T2I/c1.jpg", 4)]:
    pixels[name] = _write_image(
        os.path.join(images, name), seed, "JPEG" if name.endswith("jpg") else "PNG"
    )
  # Classification-style subset in parquet: image query, text targets shared across rows.
  labels = ["dog", "cat", "bird"]
  table = pa.table(
      {
          "qry_text": [
              "<|image_1|>\nRepresent the given image for classification",
              "<|image_1|>\nRepresent the given image for classification",
          ],
          "qry_img_path": ["VOC/q0.jpg", "VOC/q1.png"],
          "tgt_text": [labels, ["cat", "dog", "bird"]],
          "tgt_img_path": [["", "", ""], ["", "", ""]],
      }
  )
  os.makedirs(os.path.join(root, "VOC2007"))
  pq.write_table(table, os.path.join(root, "VOC2007", "test-00000-of-00001.parquet"))
  # Text-to-image subset in JSONL, with a corrupt candidate image and a bad row.
  with open(os.path.join(images, "T2I/c2.png"), "wb") as f:
    f.write(b"broken")
  _write_jsonl(
      os.path.join(root, "MSCOCO_t2i.jsonl"),
      [
          {
              "qry_text": "Find me an everyday image that matches the given caption: a red bus.",
              "qry_img_path": "",
              "tgt_text": ["<|image_1|>", "<|image_1|>", "<|image_1|>"],
              "tgt_img_path": ["T2I/c0.png", "T2I/c1.jpg", "T2I/c2.png"],
          },
          {
              "qry_text": "a green car",
              "qry_img_path": "",
              "tgt_text": ["<|image_1|>", "<|image_1|>"],
              "tgt_img_path": ["T2I/c2.png", "T2I/c0.png"],
          },  # its correct target is corrupt
          {
              "qry_text": "no targets",
              "qry_img_path": "",
              "tgt_text": ["a"],
              "tgt_img_path": ["x", "y"],
          },
      ],
  )

  summary = importers.import_dataset("mmeb", root, out, images=images)
  candidates = _read_split(out, "test_candidates")
  voc = {c["text"]: c for c in candidates.values() if c["pool"] == "VOC2007"}
  assert sorted(voc) == ["bird", "cat", "dog"]  # shared labels became one candidate each
  assert all(c["modality"] == "text" and c["image"] == b"" for c in voc.values())
  t2i = [c for c in candidates.values() if c["pool"] == "MSCOCO_t2i"]
  assert [c["modality"] for c in t2i] == ["image", "image"] and all(c["text"] == "" for c in t2i)

  queries = _read_split(out, "test_queries")
  assert list(queries) == ["MSCOCO_t2i:q0", "VOC2007:q0", "VOC2007:q1"]
  q = queries["VOC2007:q1"]
  assert q["text"] == "Represent the given image for classification"
  assert q["modality"] == "image,text" and q["task"] == q["pool"] == "VOC2007"
  np.testing.assert_array_equal(_pixels(q["image"]), pixels["VOC/q1.png"])
  assert [candidates[c]["text"] for c in q["candidate_ids"]] == ["cat", "dog", "bird"]
  assert q["positive_ids"] == q["candidate_ids"][:1]
  assert queries["VOC2007:q0"]["candidate_ids"] == [voc[l]["id"] for l in labels]
  bus = queries["MSCOCO_t2i:q0"]
  assert bus["modality"] == "text" and bus["image"] == b""
  assert len(bus["candidate_ids"]) == 2  # the corrupt third target was dropped
  np.testing.assert_array_equal(
      _pixels(candidates[bus["positive_ids"][0]]["image"]), pixels["T2I/c0.png"]
  )
  np.testing.assert_array_equal(
      _pixels(candidates[bus["candidate_ids"][1]]["image"]), pixels["T2I/c1.jpg"]
  )
  problems = summary["splits"]["test_queries"]["problems"]
  assert problems["positive_not_in_pool"]["examples"][0]["id"] == "MSCOCO_t2i:q1"
  assert problems["bad_field"]["examples"][0]["id"] == "MSCOCO_t2i:q2"
  assert problems["candidate_dropped"]["count"] == 1
  assert summary["splits"]["test_candidates"]["problems"]["corrupt_image"]["count"] == 1

  with pytest.raises(importers.RecordError, match=r"MSCOCO_t2i.*c2.png"):
    importers.import_dataset("mmeb", root, str(tmp_path / "o"), images=images, on_error="fail")
  with pytest.raises(importers.SchemaError, match="NoSuchSubset"):
    importers.import_dataset("mmeb", root, str(tmp_path / "o"), tasks=("NoSuchSubset",))


# ----------------------------------------------------------------------------------------------
# CLI and schema


def test_cli(tmp_path, capsys):
  src, out = str(tmp_path / "coco"), str(tmp_path / "out")
  _coco_fixture(src, n_images=2, captions_per_image=5)
  _break_empty_caption(src)
  argv = ["--format=coco", f"--src={src}", f"--out={out}", "--split=val2017"]
  assert prepare.main(argv) == 0
  printed = capsys.readouterr().out
  assert "val2017: 9 written, 1 skipped" in printed and "empty_caption: 1" in printed
  assert len(_read_split(out, "val2017")) == 9
  assert prepare.main(argv) == 1  # exists, no --overwrite
  assert "--overwrite" in capsys.readouterr().err
  assert prepare.main(argv + ["--overwrite", "--on_error=fail"]) == 1
  assert "1002" in capsys.readouterr().err
  assert len(_read_split(out, "val2017")) == 9  # the failed overwrite kept the dataset
  with pytest.raises(SystemExit):
    prepare.main(["--format=csv", f"--src={src}", f"--out={out}"])
  assert "mbeir" in prepare.__doc__ and "--format=mmeb" in prepare.__doc__


def test_feature_schemas_merge_and_blank():
  merged = schema.merge_features(schema.queries_features(), schema.candidates_features())
  assert set(merged) == {
      "id",
      "image",
      "text",
      "modality",
      "pool",
      "task",
      "instruction",
      "positive_ids",
      "candidate_ids",
      "negative_id",
      "negative_kind",
  }
  blank = schema.blank_example(
      schema.merge_features(
          schema.pairs_features(with_ground_truth=True), schema.caption5_features()
      )
  )
  assert blank["image"] == b"" and blank["captions"] == [] and blank["caption"] == ""
  assert blank["image_labels"].shape == (0, 0) and blank["image_labels"].dtype == np.uint8
  assert blank["caption_tags"].dtype == np.int32
  with pytest.raises(ValueError, match="'caption'"):
    schema.merge_features(
        schema.pairs_features(), {"caption": tfds.features.Tensor(shape=(None,), dtype=np.int32)}
    )
