"""Tests of the embedded world generator and its tfds builder."""

import collections
import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmret.data import world
from mmret.data import world_builder

SPEC = world.WorldSpec()
VOCAB = set(world.vocabulary("shapes"))
ATTRIBUTE_WORDS = (
    set(world.SIZES)
    | set(world.COLOURS)
    | set(world.SHAPES)
    | {w for cell in world.CELL_WORDS for w in cell}
)
FACT_VALUE_WORDS = {v for values in world.TEXT_FACT_VALUES.values() for v in values}


@pytest.fixture(scope="module")
def mm2mm_set():
  return world.mm2mm(SPEC, seed=7, num_triplets=30, num_distractors=60)


@pytest.fixture(scope="module")
def universal_set():
  return world.universal(SPEC, seed=7, queries_per_task=8, distractors_per_task=12)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  world_builder.prepare("tiny", data_dir=data_dir)
  return data_dir


def _records_equal(a: dict, b: dict) -> bool:
  if a.keys() != b.keys():
    return False
  return all(
      np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a
  )


def _words(text: str) -> list[str]:
  assert text == text.strip() and "  " not in text, f"irregular spacing in {text!r}"
  return text.split()


# ----------------------------------------------------------------------------- generator


def test_same_seed_gives_identical_records_and_other_seed_differs():
  first, again = list(world.pairs(SPEC, 3, 6)), list(world.pairs(SPEC, 3, 6))
  assert all(_records_equal(a, b) for a, b in zip(first, again, strict=True))
  other = list(world.pairs(SPEC, 4, 6))
  assert [r["caption"] for r in other] != [r["caption"] for r in first]
  # Records are independent of where generation starts.
  assert _records_equal(list(world.pairs(SPEC, 3, 2, start=4))[0], first[4])
  for make in (lambda: world.mm2mm(SPEC, 5, 6, 10), lambda: world.universal(SPEC, 5, 3, 4)):
    a, b = make(), make()
    for split_a, split_b in ((a.queries, b.queries), (a.candidates, b.candidates)):
      assert all(_records_equal(x, y) for x, y in zip(split_a, split_b, strict=True))
  c5 = lambda: list(world.caption5(SPEC, 5, 3))
  assert all(_records_equal(x, y) for x, y in zip(c5(), c5(), strict=True))


def test_vocabulary_is_sorted_and_covers_every_generated_word(mm2mm_set, universal_set):
  vocab = world.vocabulary("shapes")
  assert vocab == sorted(set(vocab))
  texts = [r["caption"] for r in world.pairs(SPEC, 0, 100)]
  texts += [r["text"] for s in (mm2mm_set, universal_set) for r in s.queries + s.candidates]
  texts += [r["instruction"] for r in universal_set.queries]
  texts += [c for r in world.caption5(SPEC, 0, 20) for c in r["captions"]]
  used = {w for text in texts for w in _words(text)}
  assert used <= VOCAB, f"words outside the vocabulary: {sorted(used - VOCAB)}"
  assert set(world.GARMENTS) <= set(world.vocabulary("fashion"))
  assert not set(world.GARMENTS) - {"top"} & VOCAB  # garments only in the fashion grammar


def test_caption_tags_follow_caption_words():
  for record in world.pairs(SPEC, 1, 60):
    words, tags = _words(record["caption"]), record["caption_tags"]
    assert tags.dtype == np.int32 and tags.shape == (len(words),), record["id"]
    for word, tag in zip(words, tags):
      if tag == 1:
        assert word in ATTRIBUTE_WORDS, (record["id"], word)
      elif tag == 2:  # training captions only describe shown objects
        assert word in FACT_VALUE_WORDS, (record["id"], word)
      else:
        assert tag == 0 and word not in FACT_VALUE_WORDS | set(world.COLOURS), (record["id"], word)
    assert (tags == 1).any() and (tags == 2).any(), record["id"]


def test_image_labels_match_rendered_pixels_and_caption():
  palette = np.array(list(world.COLOURS.values()), np.int32)
  for record in world.pairs(SPEC, 2, 60):
    image, labels = world.decode_png(record["image"]), record["image_labels"]
    assert image.shape == (64, 64, 3) and labels.shape == (64, 64) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels == 1).any(), record["id"]
    background = np.unique(image[labels == 0], axis=0)
    assert len(background) == 1, f"{record['id']}: background is not one colour"
    assert (image[labels > 0] != background[0]).any(axis=-1).all(), record["id"]
    # The colours painted with label 1 are exactly the colours the caption tags 1.
    words, tags = _words(record["caption"]), record["caption_tags"]
    tagged = {w for w, t in zip(words, tags) if t == 1 and w in world.COLOURS}
    pixels = image[labels == 1].astype(np.int32)
    nearest = np.abs(pixels[:, None] - palette[None]).sum(-1).argmin(-1)
    assert {list(world.COLOURS)[i] for i in np.unique(nearest)} == tagged, record["id"]
    assert np.abs(pixels - palette[nearest]).max() <= SPEC.colour_jitter


def test_render_places_each_object_in_its_cell():
  objects = (
      world.WorldObject("circle", "red", "large", 0),
      world.WorldObject("cross", "blue", "small", 4),
      world.WorldObject("triangle", "white", "large", 8),
  )
  content = world.Content(shown=objects, described=objects[:2])
  image, labels = world.render(content, SPEC, seed=11)
  image_again, labels_again = world.render(content, SPEC, seed=11)
  assert np.array_equal(image, image_again) and np.array_equal(labels, labels_again)
  cell = 64 / world.GRID
  rows, cols = np.indices(labels.shape)
  cell_of_pixel = (rows // cell).astype(int) * world.GRID + (cols // cell).astype(int)
  assert set(np.unique(cell_of_pixel[labels == 1])) == {0, 4}
  assert set(np.unique(cell_of_pixel[labels == 2])) == {8}
  for obj in objects:
    painted = image[(cell_of_pixel == obj.cell) & (labels > 0)].astype(int)
    assert len(painted) > 20, obj
    assert np.abs(painted - world.COLOURS[obj.colour]).max() <= SPEC.colour_jitter, obj
  # A large object covers more pixels than a small one.
  assert (cell_of_pixel[labels > 0] == 0).sum() > 2 * (cell_of_pixel[labels > 0] == 4).sum()


def test_mm2mm_triplet_invariants(mm2mm_set):
  s = mm2mm_set
  candidate_ids = [r["id"] for r in s.candidates]
  query_ids = [r["id"] for r in s.queries]
  assert len(set(candidate_ids)) == len(candidate_ids) == 30 * 2 + 60
  assert len(set(query_ids)) == 30 and not set(query_ids) & set(candidate_ids)
  by_id = {r["id"]: r for r in s.candidates}
  kinds = collections.Counter(q["negative_kind"] for q in s.queries)
  assert kinds == {"intersection": 10, "image_only": 10, "text_only": 10}
  for query in s.queries:
    anchor = s.contents[query["id"]]
    assert anchor.intersection and anchor.image_only and anchor.text_only
    assert query["modality"] == "image,text" and query["pool"] == "mm2mm"
    assert len(query["positive_ids"]) == 1 and query["candidate_ids"] == []
    positive = s.contents[query["positive_ids"][0]]
    negative = s.contents[query["negative_id"]]
    # Positive: same facts, some content in another modality, new rendering and words.
    assert positive.facts() == anchor.facts()
    assert (positive.shown, positive.described) != (anchor.shown, anchor.described)
    assert by_id[query["positive_ids"][0]]["image"] != query["image"]
    # Negative: exactly one fact replaced, of the recorded kind.
    removed, added = anchor.facts() - negative.facts(), negative.facts() - anchor.facts()
    assert len(removed) == 1 and len(added) == 1, query["id"]
    (old,), (new,) = removed, added
    assert anchor.fact_kind(old) == query["negative_kind"] == negative.fact_kind(new)
    negative_record = by_id[query["negative_id"]]
    if query["negative_kind"] == "text_only":
      assert negative_record["image"] == query["image"] and negative_record["text"] != query["text"]
    elif query["negative_kind"] == "image_only":
      assert negative_record["text"] == query["text"] and negative_record["image"] != query["image"]
    # Only the positive carries the anchor's facts.
    matches = [c for c in candidate_ids if s.contents[c].facts() == anchor.facts()]
    assert matches == query["positive_ids"]


def test_universal_positives_are_in_the_local_pool(universal_set):
  s = universal_set
  tasks = collections.Counter(q["task"] for q in s.queries)
  assert tasks == {task: 8 for task in world.UNIVERSAL_TASKS}
  assert {"qt_ci", "qi_ct", "qt_cit", "qi_cit", "qit_ct", "qit_ci", "qit_cit"} <= set(tasks)
  ids = [r["id"] for r in s.queries + s.candidates]
  assert len(set(ids)) == len(ids)
  pools = collections.defaultdict(list)
  for record in s.candidates:
    pools[record["pool"]].append(record["id"])
  for record in s.queries + s.candidates:
    modalities = record["modality"].split(",")
    assert record["modality"] in ("image", "text", "image,text"), record["id"]
    assert (record["image"] != b"") == ("image" in modalities), record["id"]
    assert (record["text"] != "") == ("text" in modalities), record["id"]
  by_id = {r["id"]: r for r in s.candidates}
  for query in s.queries:
    query_modality, candidate_modality, instruction = world.UNIVERSAL_TASKS[query["task"]]
    assert query["modality"] == query_modality and query["instruction"] == instruction
    assert query["pool"] == query["task"] and query["positive_ids"]
    target = s.targets[query["id"]]
    for positive_id in query["positive_ids"]:
      assert by_id[positive_id]["pool"] == query["pool"]
      assert by_id[positive_id]["modality"] == candidate_modality
      assert s.contents[positive_id].facts() == target
    in_pool = [c for c in pools[query["pool"]] if s.contents[c].facts() == target]
    assert sorted(in_pool) == sorted(query["positive_ids"]), query["id"]
  # Composed edits: the unedited reference picture sits in the pool and is not a positive.
  for query in (q for q in s.queries if q["task"] == "qit_ci"):
    assert s.contents[query["id"]].facts() != s.targets[query["id"]]
    references = [c for c in pools["qit_ci"] if by_id[c]["image"] == query["image"]]
    assert len(references) == 1 and references[0] not in query["positive_ids"]
    assert query["text"].split()[0] in ("add", "remove", "make")


def test_caption5_has_five_distinct_captions_of_the_image():
  for record in world.caption5(SPEC, 0, 30):
    captions = record["captions"]
    assert len(captions) == 5 and len(set(captions)) == 5, record["id"]
    assert world.decode_png(record["image"]).shape == (64, 64, 3)
    for caption in captions:
      assert set(_words(caption)) & set(world.SHAPES), caption


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="object_kind"):
    world.WorldSpec(object_kind="sketch")
  with pytest.raises(ValueError, match="max_objects"):
    world.WorldSpec(max_objects=12)
  with pytest.raises(ValueError, match="large_extent"):
    world.WorldSpec(small_extent=0.9, large_extent=0.5)
  content = world.Content(shown=(world.WorldObject("circle", "red", "small", 0),))
  with pytest.raises(ValueError, match="no text-only fact"):
    world.change_one_fact(content, "text_only", np.random.default_rng(0), SPEC)
  with pytest.raises(ValueError, match="unknown negative kind"):
    world.change_one_fact(content, "colour", np.random.default_rng(0), SPEC)
  with pytest.raises(ValueError, match="unknown mmret_world config 'huge'"):
    world_builder.prepare("huge")
  with pytest.raises(KeyError, match="lacks field 'caption'"):
    world_builder.decode_record({"id": b"x", "image": b""}, "train")


# ----------------------------------------------------------------------------- tfds


def test_tfds_round_trip(tiny_dir):
  builder = tfds.builder("mmret_world/tiny", data_dir=tiny_dir)
  assert builder.info.metadata["vocab"] == world.vocabulary("shapes")
  config = builder.builder_config
  expected_sizes = {
      "train": config.num_train,
      "val": config.num_val,
      "mm2mm_queries": config.num_mm2mm_triplets,
      "mm2mm_val_queries": config.num_mm2mm_triplets,
      "mm2mm_candidates": 2 * config.num_mm2mm_triplets + config.num_mm2mm_distractors,
      "universal_queries": len(world.UNIVERSAL_TASKS) * config.universal_queries_per_task,
      "caption5": config.num_caption5,
  }
  records = {}
  for split, fields in world_builder.SPLIT_FIELDS.items():
    source = tfds.data_source("mmret_world/tiny", data_dir=tiny_dir, split=split)
    if split in expected_sizes:
      assert len(source) == expected_sizes[split], split
    raw = source[0]
    assert isinstance(raw["image"], bytes) and isinstance(raw["id"], bytes)
    for name in set(raw) - set(fields):  # fields of other splits hold empty values
      assert np.size(raw[name]) == 0 or raw[name] == b"", (split, name)
    records[split] = {
        r["id"]: r
        for r in (world_builder.decode_record(source[i], split) for i in range(len(source)))
    }
    assert all(set(r) == set(fields) for r in records[split].values())
  # The stored records are the generator's records.
  spec = config.spec()
  for record in world.pairs(spec, config.seed, 5):
    assert _records_equal(records["train"][record["id"]], record)
  mm2mm = world.mm2mm(spec, config.seed, config.num_mm2mm_triplets, config.num_mm2mm_distractors)
  for query in mm2mm.queries[:5]:
    assert records["mm2mm_queries"][query["id"]] == query
  for candidate in mm2mm.candidates[:5]:
    assert records["mm2mm_candidates"][candidate["id"]] == candidate
  for record in world.caption5(spec, config.seed, 3):
    assert records["caption5"][record["id"]] == record
  # The held-out sets are the generator's too, and share no content with the reported ones.
  for record in world.pairs(spec, config.seed, 3, name="val"):
    assert _records_equal(records["val"][record["id"]], record)
  captions = lambda split: {r["caption"] for r in records[split].values()}
  assert not captions("val") & captions("train")
  mm2mm_val = world.mm2mm(spec, config.seed, config.num_mm2mm_triplets, 0, name="mm2mm_val")
  for query in mm2mm_val.queries[:3]:
    assert records["mm2mm_val_queries"][query["id"]]["text"] == query["text"]
  texts = lambda split: {r["text"] for r in records[split].values()}
  assert not texts("mm2mm_val_queries") & texts("mm2mm_queries")
  assert {r["pool"] for r in records["mm2mm_val_candidates"].values()} == {"mm2mm_val"}
  candidates = records["universal_candidates"]
  for query in records["universal_queries"].values():
    assert all(candidates[p]["pool"] == query["pool"] for p in query["positive_ids"])
  # Preparing again reuses the data on disk.
  assert world_builder.prepare("tiny", data_dir=tiny_dir).info.splits["train"].num_examples == 512


def test_fashion_world_draws_garments(tmp_path):
  named = {c.name: c for c in world_builder.MmretWorld.BUILDER_CONFIGS}["fashion_tiny"]
  config = dataclasses.replace(
      named,
      name="fashion_test",
      num_train=16,
      num_mm2mm_triplets=6,
      num_mm2mm_distractors=6,
      universal_queries_per_task=2,
      universal_distractors_per_task=2,
      num_caption5=4,
  )
  builder = world_builder.prepare(config, data_dir=str(tmp_path))
  assert builder.info.metadata["vocab"] == world.vocabulary("fashion")
  source = builder.as_data_source("train")
  garments = set(world.GARMENTS)
  for i in range(len(source)):
    record = world_builder.decode_record(source[i], "train")
    image, labels = world.decode_png(record["image"]), record["image_labels"]
    words, tags = _words(record["caption"]), record["caption_tags"]
    assert {w for w, t in zip(words, tags) if t == 1} & garments, record["caption"]
    assert (labels == 1).sum() > 10, record["id"]
    background = np.median(image[labels == 0], axis=0)
    assert (np.abs(image[labels > 0].astype(int) - background).sum(-1) > 30).mean() > 0.9
  # Evaluation splits draw garments from the held-out half of Fashion-MNIST.
  train_images, _ = world.load_fashion_mnist(world.DEFAULT_FASHION_DIR, "train")
  test_images, _ = world.load_fashion_mnist(world.DEFAULT_FASHION_DIR, "t10k")
  assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)


def test_missing_fashion_package_says_how_to_install(tmp_path):
  spec = world.WorldSpec(object_kind="fashion", fashion_dir=str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    list(world.pairs(spec, 0, 1))
  config = world_builder.WorldConfig(
      name="fashion_missing", object_kind="fashion", fashion_dir=str(tmp_path / "absent")
  )
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    world_builder.prepare(config, data_dir=str(tmp_path / "data"))
