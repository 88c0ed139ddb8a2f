"""``data=DIR``: every recipe trains on a dataset made by ``python -m mmret.prepare``, tokenised
with the vocabulary the import stored, and evaluates on what the dataset has."""

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import clip, gcl, selfalign, solar
from mmret import config_lib, train
from mmret.data import importers, pipeline, tokenizers
from mmret.data.importers import schema

RECIPES = {"clip": clip, "gcl": gcl, "solar": solar, "selfalign": selfalign}
COLOURS = ("red", "green", "blue", "yellow")
ANIMALS = ("dog", "cat", "horse", "bird")
PLACES = ("bench", "beach", "street", "table", "field")
# The recipes' evaluations that need the embedded world: skipped with data=DIR.
WORLD_ONLY = {
    "clip": ["evals.universal"],
    "gcl": ["evals.gap_universal", "evals.universal"],
    "solar": ["stages.stage1.evals.masks", "stages.stage2.evals.mm2mm"],
    "selfalign": [],
}


def _captions(i: int, animal: str = "") -> list:
  colour, animal = COLOURS[i % 4], animal or ANIMALS[i // 4 % 4]
  return [f"A {colour} {animal} near the {place}." for place in PLACES]


def _write_image(path: str, i: int):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(i).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format="PNG")


def _coco_source(root: str, split: str = "val2017", n_images: int = 8) -> str:
  """COCO captions layout: ``annotations/captions_<split>.json`` and ``<split>/`` images."""
  images, annotations = [], []
  for i in range(n_images):
    name = f"{i:012d}.png"
    _write_image(os.path.join(root, split, name), i)
    images.append({"id": i, "file_name": name})
    for k, caption in enumerate(_captions(i)):
      annotations.append({"id": 100 * i + k, "image_id": i, "caption": caption})
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
    json.dump({"images": images, "annotations": annotations}, f)
  return root


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
  """A COCO import: PAIRS ``val2017`` (40 pairs) and CAPTION5 ``val2017_caption5`` (8 images)."""
  root = tmp_path_factory.mktemp("coco")
  src = _coco_source(str(root / "src"))
  importers.import_dataset("coco", src, str(root / "out"), split="val2017")
  return str(root / "out")


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
  """A Karpathy import: PAIRS ``train``, CAPTION5 ``val`` and ``test``; 'zebra' only in test."""
  root = tmp_path_factory.mktemp("karpathy")
  entries = []
  for i, split in enumerate(["train"] * 4 + ["restval", "val", "test"]):
    _write_image(str(root / "images" / f"{i}.png"), i)
    captions = _captions(i, "zebra" if split == "test" else "")
    sentences = [{"sentid": 10 * i + k, "raw": c} for k, c in enumerate(captions)]
    entries.append({"filename": f"{i}.png", "imgid": i, "split": split, "sentences": sentences})
  with open(root / "dataset_flickr8k.json", "w") as f:
    json.dump({"images": entries}, f)
  importers.import_dataset(
      "karpathy",
      str(root / "images"),
      str(root / "out"),
      annotations=str(root / "dataset_flickr8k.json"),
  )
  return str(root / "out")


def _evals(config) -> dict:
  """'<group>.<name>' -> fields of every evaluation of ``config`` and its stages."""
  found = {f"evals.{n}": dict(c) for n, c in config.evals.items()}
  for stage, overrides in (config.get("stages") or {}).items():
    found.update(
        {f"stages.{stage}.evals.{n}": dict(c) for n, c in overrides.get("evals", {}).items()}
    )
  return found


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_trains_and_evaluates_on_the_dataset(recipe, coco, caplog):
  caplog.set_level(logging.WARNING)
  config = RECIPES[recipe].get_config(f"data={coco}")
  for _, stage in train.stage_configs(config):
    assert stage.input.train == [{"dataset": coco, "split": "val2017", "weight": 1.0}]
    assert stage.input.tokenizer in tokenizers.DATASET_SPECS
  evals = _evals(config)
  assert all(e["dataset"] == coco for e in evals.values()), evals  # none reads the world
  caption5 = [e for e in evals.values() if e["type"] == "caption5"]
  assert [e["split"] for e in caption5] == ["val2017_caption5"]
  if recipe == "solar":  # its evaluations are the last stage's
    assert evals["stages.stage2.evals.caption5"]["every"] == 0
  if recipe == "gcl":  # the modality gap of the training pairs follows the data
    assert evals["evals.gap_train"]["split"] == "val2017"
  if recipe == "selfalign":  # the recipe's own caption5 options are kept
    assert evals["evals.caption5"]["batch_size"] == 100
  skipped = [r.getMessage() for r in caplog.records if "skipping evaluation" in r.getMessage()]
  for name in WORLD_ONLY[recipe]:
    assert name not in evals
    (line,) = [m for m in skipped if f"skipping evaluation {name} " in m]
    assert "mmret_world/tiny" in line and ("lacks" in line or "has no" in line), line
  # Without data the recipe is the world's, as before.
  world = RECIPES[recipe].get_config()
  assert world.input.train[0]["dataset"] == "mmret_world/tiny"
  assert all(e["dataset"].startswith("mmret_world/") for e in _evals(world).values())


def test_karpathy_splits_and_selfalign_options(karpathy):
  config = selfalign.get_config(f"data={karpathy},fold_size=1000")
  assert config.input.train == [{"dataset": karpathy, "split": "train", "weight": 1.0}]
  evals = _evals(config)
  assert (evals["evals.caption5"]["split"], evals["evals.caption5"]["fold_size"]) == ("test", 1000)
  assert evals["evals.caption5_val"]["split"] == "val"
  # The vocabulary holds the training captions' words only: 'zebra' (test only) is unknown.
  tokenizer = pipeline.tokenizer_for(config.input)
  assert tokenizer.text_ids("zebra dog") == [tokenizer.unk_id, tokenizer.id_of["dog"]]


def test_dataset_tokenizer_encodes_real_captions(coco, tmp_path):
  config = clip.get_config(f"data={coco}")
  tokenizer = pipeline.tokenizer_for(config.input)
  words = sorted({w for i in range(8) for c in _captions(i) for w in tokenizers.split_words(c)})
  ids = [tokenizer.id_of.get(w) for w in words]
  assert None not in ids and tokenizer.unk_id not in ids and len(set(ids)) == len(words)
  ids, mask = tokenizer.encode(["A red dog near the zyzzyva."], 16)
  expected = [tokenizer.id_of[w] for w in ("a", "red", "dog", "near", "the")]
  assert list(ids[0, : mask[0].sum()]) == [
      tokenizer.start_id,
      *expected,
      tokenizer.unk_id,
      tokenizer.id_of["."],
      tokenizer.end_id,
  ]
  # Shipped towers keep their own tokenizer.
  shipped = gcl.get_config(f"data={coco},towers=shipped")
  assert shipped.input.tokenizer.startswith("wordpiece:")
  assert shipped.input.train[0]["dataset"] == coco


def test_dataset_imported_without_vocabulary_says_how_to_fix(coco, tmp_path):
  old = str(tmp_path / "old_import")
  shutil.copytree(coco, old)
  with open(os.path.join(old, "metadata.json")) as f:
    metadata = json.load(f)
  del metadata["vocab"]
  with open(os.path.join(old, "metadata.json"), "w") as f:
    json.dump(metadata, f)
  config = clip.get_config(f"data={old}")
  with pytest.raises(ValueError, match=r"(?s)no word vocabulary.*--overwrite.*tokenizer=word:PATH"):
    pipeline.tokenizer_for(config.input)


def test_split_choice_and_bad_data(coco, tmp_path):
  assert clip.get_config(f"data={coco}/val2017").input.train[0]["split"] == "val2017"
  assert clip.get_config(f"data={coco},split=val2017").input.train[0]["split"] == "val2017"
  with pytest.raises(ValueError, match="'val2017_caption5' is not a training split"):
    clip.get_config(f"data={coco}/val2017_caption5")
  with pytest.raises(ValueError, match=r"no split 'train'; its splits: val2017 \(pairs\)"):
    gcl.get_config(f"data={coco},split=train")
  with pytest.raises(
      FileNotFoundError,
      match=rf"{re.escape(coco)}o does not exist; make a dataset with python -m mmret.prepare",
  ):
    solar.get_config(f"data={coco}o")
  with pytest.raises(ValueError, match="no data is given"):
    clip.get_config("split=train")
  # A dataset without a PAIRS split has nothing to train on.
  src = _coco_source(str(tmp_path / "src"), n_images=1)
  only5 = str(tmp_path / "only_caption5")
  importers.import_dataset("coco", src, only5, split="val2017", outputs=("caption5",))
  with pytest.raises(
      ValueError, match=rf"{re.escape(only5)} has no training split.*val2017_caption5"
  ):
    selfalign.get_config(f"data={only5}")
  # Several PAIRS splits: the error lists them and split= chooses.
  pairs = {"id": "p0", "image": (tmp_path / "src" / "val2017" / "000000000000.png").read_bytes()}
  plan = importers.ImportPlan(
      "two PAIRS splits",
      {"a": schema.pairs_features(), "b": schema.pairs_features()},
      {s: (lambda: [("p0", "x.json", lambda: {**pairs, "caption": "a dog"})]) for s in ("a", "b")},
  )
  two = importers.write_dataset(plan, str(tmp_path / "two"), importers.ProblemLog("fail"))
  with pytest.raises(ValueError, match=r"several training splits \['a', 'b'\]: choose one"):
    clip.get_config(f"data={two}")
  assert clip.get_config(f"data={two},split=b").input.train[0]["split"] == "b"


def test_clip_trains_and_evaluates_on_imported_data(coco, tmp_path):
  config = clip.get_config(f"data={coco},steps=2")
  config.mapping = "shard_map"
  config.model.image.depth = config.model.text.depth = 1
  config.input.data_dir = str(tmp_path / "data")
  config.input.batch_size = 16
  config.log_every = 1
  config.optim.warmup_steps = 1
  workdir = str(tmp_path / "run")
  final = train.run(config, workdir, handle_signals=False)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(x) for x in f]
  assert [x["step"] for x in lines if "loss" in x] == [1, 2]
  assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
  recall = {k: v for k, v in final.items() if re.match(r"eval/caption5/(i2t|t2i)/recall@", k)}
  assert len(recall) == 6 and all(0 <= v <= 100 for v in recall.values()), final
  assert not any(k.startswith("eval/universal") for k in final)
  assert os.path.exists(os.path.join(workdir, "eval", "caption5.json"))
