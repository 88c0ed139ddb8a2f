"""Training stream and evaluation batches over small tfds fixtures written by this test.

Fixture images encode their record index in pixel (0, 0) and draw intersection objects red
and image-only objects green, so batches can be traced back to records and labels checked
against pixels.
"""

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmret.data import pipeline, shuffle, sources

IMAGE_SIZE = 16
NUM_RECORDS = 24
# The whole stream and the second of two process shares.
SHARES = ({}, {"process_index": 1, "process_count": 2})
NUM_PLAIN_RECORDS = 10
VOCAB = ["a", "red", "green", "square", "at", "dawn", "near", "the", "river", "and"]
LABEL_COLOURS = {1: (255, 0, 0), 2: (0, 255, 0)}
CORRUPT_ID = "bad-2"


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


def _world_like_record(index: int) -> dict:
  """An image with two rectangles (label 1 red, label 2 green) and a tagged caption."""
  rng = np.random.default_rng(index)
  labels = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  for label in (1, 2):
    top, left = rng.integers(1, IMAGE_SIZE - 6, size=2)
    height, width = rng.integers(4, 7, size=2)
    labels[top : top + height, left : left + width] = label
  image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for label, colour in LABEL_COLOURS.items():
    image[labels == label] = colour
  labels[0, 0] = 0
  image[0, 0] = (0, 0, 4 * index + 4)  # the record's marker
  words = ["a", "red", "square"] + [VOCAB[int(i)] for i in rng.integers(3, 10, size=index % 5)]
  tags = [0, 1, 1] + [2] * (len(words) - 3)
  return {
      "id": f"rec-{index}",
      "image": _png(image),
      "caption": " ".join(words),
      "caption_tags": np.asarray(tags, np.int32),
      "image_labels": labels,
  }


class MmretPipelineFixture(tfds.core.GeneratorBasedBuilder):
  """PAIRS schema with ground truth; split 'corrupt' holds one undecodable image."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                "id": tfds.features.Text(),
                "image": tfds.features.Scalar(dtype=np.object_),
                "caption": tfds.features.Text(),
                "caption_tags": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "image_labels": tfds.features.Tensor(
                    shape=(None, None), dtype=np.uint8, encoding="zlib"
                ),
            }
        ),
        metadata=tfds.core.MetadataDict(vocab=VOCAB),
    )

  def _split_generators(self, dl_manager):
    return {
        "train": self._generate_examples(NUM_RECORDS, corrupt=False),
        "corrupt": self._generate_examples(4, corrupt=True),
    }

  def _generate_examples(self, count, corrupt):
    for index in range(count):
      record = _world_like_record(index)
      if corrupt:
        record["id"] = f"bad-{index}" if index == 2 else f"ok-{index}"
        if index == 2:
          record["image"] = record["image"][:40]  # a truncated PNG
      yield record["id"], record


class MmretPipelinePlainFixture(tfds.core.GeneratorBasedBuilder):
  """PAIRS schema without ground truth, JPEG images on a white background."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                "id": tfds.features.Text(),
                "image": tfds.features.Scalar(dtype=np.object_),
                "caption": tfds.features.Text(),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for index in range(NUM_PLAIN_RECORDS):
      image = np.full((IMAGE_SIZE + 4, IMAGE_SIZE, 3), 255, np.uint8)
      yield f"plain-{index}", {
          "id": f"plain-{index}",
          "image": _jpeg(image),
          "caption": "the river at dawn",
      }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  paths = {}
  for name, cls in (("world_like", MmretPipelineFixture), ("plain", MmretPipelinePlainFixture)):
    builder = cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    paths[name] = str(builder.data_dir)
  paths["data_dir"] = data_dir
  return paths


def _cfg(data, *, train=None, **overrides):
  cfg = pipeline.default_input_config()
  cfg.data_dir = data["data_dir"]
  cfg.train = train or [{"dataset": data["world_like"], "split": "train", "weight": 1.0}]
  cfg.batch_size = 8
  cfg.image_size = IMAGE_SIZE
  cfg.max_text_len = 8
  cfg.read_threads = 2
  for key, value in overrides.items():
    if isinstance(value, dict):
      cfg[key].update(value)
    else:
      cfg[key] = value
  return cfg


def _pixels(cfg, image):
  """A batch's image as integer pixels (batches carry the uint8 pixels themselves)."""
  del cfg
  assert image.dtype == np.uint8, image.dtype
  return image.astype(int)


def _record_indices(cfg, batch):
  return ((_pixels(cfg, batch["image"])[:, 0, 0, 2] - 4) // 4).tolist()


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_have_static_shapes_and_ground_truth(data):
  cfg = _cfg(data)
  iterator = pipeline.make_train_iterator(cfg, seed=0)
  for batch in _take(iterator, 4):  # crosses an epoch boundary (24 records, 8 per batch)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "image": ((8, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
        "text_ids": ((8, 8), np.int32),
        "text_mask": ((8, 8), bool),
        "text_intersection": ((8, 8), np.int32),
        "image_labels": ((8, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
    }
    # Records were written with "a red square ..." tagged 0 1 1 2 ...: start token, then tags.
    assert (batch["text_intersection"][:, :4] == [0, 0, 1, 1]).all()
    assert (batch["text_intersection"][~batch["text_mask"]] == 0).all()
    tokenizer = pipeline.tokenizer_for(cfg)
    assert tokenizer is pipeline.tokenizer_for(cfg)  # built once per spec
    assert (batch["text_ids"][:, 2] == tokenizer.id_of["red"]).all()
    for row, index in enumerate(_record_indices(cfg, batch)):
      np.testing.assert_array_equal(
          batch["image_labels"][row], _world_like_record(index)["image_labels"]
      )


def test_first_epoch_is_a_permutation_and_epochs_differ(data):
  cfg = _cfg(data)
  batches = _take(pipeline.make_train_iterator(cfg, seed=3), 6)
  first = sum((_record_indices(cfg, b) for b in batches[:3]), [])
  second = sum((_record_indices(cfg, b) for b in batches[3:]), [])
  assert sorted(first) == sorted(second) == list(range(NUM_RECORDS))
  assert first != second  # reshuffled each epoch


def test_stream_order_is_grains_shuffle(data, monkeypatch):
  """The block-computed shuffle leaves the stream exactly as grain's own shuffle made it."""
  cfg = _cfg(data, augment={"crop_scale": (0.5, 1.0)})
  ours = [_take(pipeline.make_train_iterator(cfg, seed=5, **share), 9) for share in SHARES]
  monkeypatch.setattr(shuffle, "EpochShuffle", lambda parent, seed: parent.shuffle(seed=seed))
  theirs = [_take(pipeline.make_train_iterator(cfg, seed=5, **share), 9) for share in SHARES]
  for a, b in zip(ours, theirs):
    _assert_same_batches(a, b)


def test_same_seed_same_stream_and_resume_from_state(data):
  cfg = _cfg(data, augment={"crop_scale": (0.5, 1.0), "flip": True})
  _assert_same_batches(
      _take(pipeline.make_train_iterator(cfg, seed=1), 3),
      _take(pipeline.make_train_iterator(cfg, seed=1), 3),
  )
  other_seed = _take(pipeline.make_train_iterator(cfg, seed=2), 1)[0]
  assert (
      other_seed["image"] != _take(pipeline.make_train_iterator(cfg, seed=1), 1)[0]["image"]
  ).any()

  iterator = pipeline.make_train_iterator(cfg, seed=1)
  _take(iterator, 2)
  # Checkpoints store the state as JSON.
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 3)
  resumed = pipeline.make_train_iterator(cfg, seed=1)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 3), expected)


def _shards(cfg, seed, steps, process_count=2):
  return [
      _take(
          pipeline.make_train_iterator(
              cfg, seed=seed, process_index=p, process_count=process_count
          ),
          steps,
      )
      for p in range(process_count)
  ]


def test_process_shards_are_disjoint_and_cover_the_data(data):
  cfg = _cfg(data)
  global_batches = _take(pipeline.make_train_iterator(cfg, seed=5), 3)
  shards = _shards(cfg, seed=5, steps=3)
  for step, global_batch in enumerate(global_batches):
    parts = [shard[step] for shard in shards]
    assert parts[0]["image"].shape[0] == 4
    ids = [set(_record_indices(cfg, part)) for part in parts]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(_record_indices(cfg, global_batch))
  first_epoch = [i for shard in shards for part in shard for i in _record_indices(cfg, part)]
  assert sorted(first_epoch) == list(range(NUM_RECORDS))


def test_process_shards_rebuild_the_augmented_global_batch(data):
  cfg = _cfg(data, augment={"crop_scale": (0.5, 1.0), "flip": True})
  global_batches = _take(pipeline.make_train_iterator(cfg, seed=5), 2)
  shards = _shards(cfg, seed=5, steps=2)
  for step, global_batch in enumerate(global_batches):
    # Same examples, augmentations included: global row j * 2 + p is row j of process p.
    for process, shard in enumerate(shards):
      for key, value in shard[step].items():
        np.testing.assert_array_equal(global_batch[key][process::2], value, err_msg=key)


def test_sources_are_mixed_by_weight(data):
  train = [
      {"dataset": data["world_like"], "split": "train", "weight": 3.0},
      {"dataset": data["plain"], "split": "train", "weight": 1.0},
  ]
  cfg = _cfg(data, train=train)
  batches = _take(pipeline.make_train_iterator(cfg, seed=0), 20)
  # Ground truth is dropped when one source lacks it: keys stay fixed along the stream.
  assert set(batches[0]) == {"image", "text_ids", "text_mask"}
  # The plain source has white backgrounds.
  from_plain = np.concatenate([_pixels(cfg, b["image"])[:, 8, 0].mean(-1) > 200 for b in batches])
  assert from_plain.size == 160
  assert abs(from_plain.mean() - 0.25) < 0.03


def test_augmentation_keeps_labels_on_their_pixels(data):
  cfg = _cfg(data, image_size=24, augment={"crop_scale": (0.3, 1.0), "flip": True})
  batches = _take(pipeline.make_train_iterator(cfg, seed=7), 4)
  plain = _take(pipeline.make_train_iterator(_cfg(data, image_size=24), seed=7), 4)
  assert any((a["image_labels"] != b["image_labels"]).any() for a, b in zip(batches, plain))

  def agreement(labels, pixels):
    hits = []
    for label, colour in LABEL_COLOURS.items():
      channel = colour.index(255)
      hits.append(pixels[..., channel][labels == label] > 127)
    return np.concatenate(hits).mean()

  pixels = np.concatenate([_pixels(cfg, b["image"]) for b in batches])
  labels = np.concatenate([b["image_labels"] for b in batches])
  assert (labels > 0).sum() > 500
  assert agreement(labels, pixels) > 0.95
  # The check can fail: labels mirrored relative to their images disagree.
  assert agreement(labels[:, :, ::-1], pixels) < 0.8


def test_workers_give_the_same_batches(data):
  cfg = _cfg(data, augment={"crop_scale": (0.5, 1.0), "flip": True})
  expected = _take(pipeline.make_train_iterator(cfg, seed=11), 4)
  cfg.worker_count = 2
  iterator = pipeline.make_train_iterator(cfg, seed=11)  # one start-up: workers are slow to spawn
  try:
    _assert_same_batches(_take(iterator, 2), expected[:2])
    state = iterator.get_state()
    _assert_same_batches(_take(iterator, 2), expected[2:])
    iterator.set_state(state)  # rewinds the workers
    _assert_same_batches(_take(iterator, 2), expected[2:])
  finally:
    iterator.close()


def test_corrupt_image_error_names_the_record(data):
  cfg = _cfg(
      data, train=[{"dataset": data["world_like"], "split": "corrupt", "weight": 1.0}], batch_size=4
  )
  with pytest.raises(ValueError, match=rf"corrupt: record '{CORRUPT_ID}'.*cannot decode image"):
    next(pipeline.make_train_iterator(cfg, seed=0))


def test_open_split_records_and_errors(data):
  source = sources.open_split(data["world_like"], "train", data["data_dir"])
  assert len(source) == NUM_RECORDS
  record = source[0]
  assert isinstance(record["id"], str) and isinstance(record["caption"], str)
  assert isinstance(record["image"], bytes)
  # A sequence: iteration ends at the last record, negative indices count from the end.
  assert [r["id"] for r in source] == [source[i]["id"] for i in range(NUM_RECORDS)]
  assert source[-1]["id"] == source[NUM_RECORDS - 1]["id"]
  for index in (NUM_RECORDS, -NUM_RECORDS - 1):
    with pytest.raises(IndexError, match=f"record {index} of RecordSource"):
      source[index]
  # Also by registered name under data_dir.
  by_name = sources.open_split("mmret_pipeline_fixture", "train", data["data_dir"])
  assert by_name[0]["id"] == record["id"]
  assert sources.dataset_metadata(data["world_like"], data["data_dir"])["vocab"] == VOCAB
  with pytest.raises(KeyError, match=r"no split 'test'.*\['corrupt', 'train'\]"):
    sources.open_split(data["world_like"], "test", data["data_dir"])
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.open_split(data["data_dir"] + "/nowhere", "train", data["data_dir"])
  with pytest.raises(ValueError, match="no_such_dataset"):
    sources.open_split("no_such_dataset/x", "train", data["data_dir"])


def _decoder_features():
  """Every kind of feature ``sources.ExampleDecoder`` decodes itself."""
  return tfds.features.FeaturesDict(
      {
          "id": tfds.features.Text(),
          "image": tfds.features.Scalar(dtype=np.object_),
          "count": tfds.features.Scalar(dtype=np.int64),
          "score": tfds.features.Scalar(dtype=np.float32),
          "tags": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "box": tfds.features.Tensor(shape=(2, 2), dtype=np.float32),
          "labels": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
          "bytes_labels": tfds.features.Tensor(shape=(3,), dtype=np.uint8, encoding="bytes"),
          "captions": tfds.features.Sequence(tfds.features.Text()),
          "points": tfds.features.Sequence(tfds.features.Tensor(shape=(2,), dtype=np.int64)),
      }
  )


def _decoder_example(index: int) -> dict:
  rng = np.random.default_rng(index)
  return {
      "id": f"ex-{index}" if index % 3 else "",
      "image": _png(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)) if index % 4 else b"",
      "count": int(rng.integers(-(2**40), 2**40)),
      "score": float(rng.normal()),
      "tags": rng.integers(-5, 5, index % 4).astype(np.int32),
      "box": rng.normal(size=(2, 2)).astype(np.float32),
      "labels": rng.integers(0, 3, (index % 3 + 1, index % 5 + 2)).astype(np.uint8),
      "bytes_labels": rng.integers(0, 256, 3).astype(np.uint8),
      "captions": [f"caption {i} \u00e9" for i in range(index % 3)],
      "points": rng.integers(0, 9, (index % 3, 2)),
  }


def _assert_same_value(ours, theirs, where):
  assert type(ours) is type(theirs), where  # pylint: disable=unidiomatic-typecheck
  if isinstance(theirs, np.ndarray):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
    np.testing.assert_array_equal(ours, theirs, err_msg=where)
  elif isinstance(theirs, list):
    assert len(ours) == len(theirs), where
    for a, b in zip(ours, theirs):
      _assert_same_value(a, b, where)
  else:
    assert ours == theirs, where


def test_example_decoder_matches_tfds_decoding():
  features = _decoder_features()
  decoder = sources.ExampleDecoder.for_fields(features, set(features.keys()))
  assert decoder is not None
  for index in range(12):
    serialized = features.serialize_example(_decoder_example(index))
    expected = features.deserialize_example_np(serialized)
    decoded = decoder(serialized)
    assert decoded.keys() == expected.keys()
    for key in expected:
      _assert_same_value(decoded[key], expected[key], f"example {index}, {key}")
  # A subset of the fields decodes only those.
  subset = sources.ExampleDecoder.for_fields(features, {"id", "labels"})
  assert set(subset(features.serialize_example(_decoder_example(1)))) == {"id", "labels"}


def test_example_decoder_leaves_other_features_to_tfds():
  for feature in (
      tfds.features.Image(shape=(4, 4, 3)),
      tfds.features.FeaturesDict({"x": tfds.features.Text()}),
      tfds.features.Sequence(tfds.features.Sequence(tfds.features.Text())),
  ):
    features = tfds.features.FeaturesDict({"id": tfds.features.Text(), "other": feature})
    assert sources.ExampleDecoder.for_fields(features, {"id", "other"}) is None
    assert sources.ExampleDecoder.for_fields(features, {"id"}) is not None


def test_nearest_resize_picks_pil_pixels():
  from mmret.data import preprocess  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  for _ in range(300):
    height, width = rng.integers(1, 70, size=2)
    labels = rng.integers(0, 256, (height, width), dtype=np.uint8)
    crop_h, crop_w = rng.integers(1, height + 1), rng.integers(1, width + 1)
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    box = None if rng.random() < 0.2 else (int(top), int(left), int(crop_h), int(crop_w))
    size = int(rng.integers(1, 80))
    top, left, crop_h, crop_w = box if box is not None else (0, 0, height, width)
    expected = np.asarray(
        Image.fromarray(labels).resize(
            (size, size), Image.Resampling.NEAREST, box=(left, top, left + crop_w, top + crop_h)
        )
    )
    np.testing.assert_array_equal(
        preprocess.crop_resize(labels, box, size, nearest=True), expected, err_msg=str(box)
    )


def test_open_image_matches_decoded_pixels():
  from mmret.data import preprocess  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
  encoded = [_png(rgb), _jpeg(rgb), _png(rgb[..., 0])]
  encoded.append(_png(np.concatenate([rgb, rgb[..., :1]], axis=-1)))  # RGBA
  palette = io.BytesIO()
  Image.fromarray(rgb).convert("P").save(palette, "PNG")
  encoded.append(palette.getvalue())
  for data in encoded:
    with Image.open(io.BytesIO(data)) as image:
      expected = np.asarray(image.convert("RGB"))
    opened = preprocess.open_image(data, where="x")
    assert opened.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(opened), expected)
    np.testing.assert_array_equal(preprocess.decode_image(data, where="x"), expected)
    # Resizing the opened image or its pixels gives the same array.
    for box in (None, (1, 2, 6, 8)):
      np.testing.assert_array_equal(
          preprocess.crop_resize(opened, box, 7), preprocess.crop_resize(expected, box, 7)
      )
  with pytest.raises(ValueError, match="rec-3: cannot decode image"):
    preprocess.open_image(_png(rgb)[:40], where="rec-3")


def _eval_items(count, *, image=True, text=True):
  items = []
  for index in range(count):
    record = _world_like_record(index)
    items.append(
        {
            "id": record["id"],
            "image": record["image"] if image else b"",
            "text": record["caption"] if text else "",
        }
    )
  return items


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_pad_and_index(data, process_count):
  cfg = _cfg(data)
  items = _eval_items(11)
  tokenizer = pipeline.tokenizer_for(cfg)
  seen = []
  batch_counts = []
  for process in range(process_count):
    per_process = 4 // process_count
    batches = list(
        pipeline.eval_batches(
            items,
            input_cfg=cfg,
            batch_size=per_process,
            process_index=process,
            process_count=process_count,
        )
    )
    batch_counts.append(len(batches))
    for batch in batches:
      assert batch["image"].shape == (per_process, IMAGE_SIZE, IMAGE_SIZE, 3)
      assert batch["text_ids"].shape == (per_process, 8) and batch["valid"].dtype == bool
      assert ((batch["index"] == -1) == ~batch["valid"]).all()
      for row in np.flatnonzero(batch["valid"]):
        index = int(batch["index"][row])
        assert index % process_count == process
        assert _record_indices(cfg, {"image": batch["image"][row : row + 1]}) == [index]
        ids, _ = tokenizer.encode([items[index]["text"]], 8)
        np.testing.assert_array_equal(batch["text_ids"][row], ids[0])
        seen.append(index)
      # Padding rows hold an empty text, never a fully masked row.
      assert batch["text_mask"][:, :2].all()
  assert sorted(seen) == list(range(11))
  assert len(set(batch_counts)) == 1  # every process runs the same number of steps
  # 11 items: 3 batches of 4, or 3 batches of 2 for the 6 (process 0) and 5 (process 1) items.
  assert batch_counts[0] == 3


def test_eval_batches_single_modality_and_mixed_error(data):
  cfg = _cfg(data)
  text_only = list(pipeline.eval_batches(_eval_items(5, image=False), input_cfg=cfg, batch_size=4))
  assert [set(b) for b in text_only] == [{"text_ids", "text_mask", "valid", "index"}] * 2
  assert text_only[1]["valid"].tolist() == [True, False, False, False]
  image_only = list(pipeline.eval_batches(_eval_items(4, text=False), input_cfg=cfg, batch_size=4))
  assert [set(b) for b in image_only] == [{"image", "valid", "index"}]
  mixed = _eval_items(3) + _eval_items(1, image=False)
  with pytest.raises(ValueError, match="item 3 .*rec-0.*group items by modality"):
    list(pipeline.eval_batches(mixed, input_cfg=cfg, batch_size=4))


# ----------------------------------------------------------------------------------------------
# The embedded world, prepared by name on first use.


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("world"))


def test_default_pipeline_on_the_world(world_dir):
  cfg = pipeline.default_input_config()
  cfg.data_dir = world_dir
  cfg.batch_size = 8
  cfg.max_text_len = 64  # world captions run to ~50 words
  batch = next(pipeline.make_train_iterator(cfg, seed=0))
  size = cfg.image_size
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "image": ((8, size, size, 3), np.uint8),
      "text_ids": ((8, 64), np.int32),
      "text_mask": ((8, 64), bool),
      "text_intersection": ((8, 64), np.int32),
      "image_labels": ((8, size, size), np.uint8),
  }
  tokenizer = pipeline.tokenizer_for(cfg)
  assert (batch["text_ids"][batch["text_mask"]] != tokenizer.unk_id).all()
  assert (batch["text_intersection"] == 1).any() and (batch["image_labels"] == 1).any()
  # Every caption fits: the end token is the last real one.
  assert (batch["text_ids"][np.arange(8), batch["text_mask"].sum(1) - 1] == tokenizer.end_id).all()


def test_world_splits_keep_their_own_fields(world_dir):
  caption5 = sources.open_split("mmret_world/tiny", "caption5", world_dir)
  assert set(caption5[0]) == {"id", "image", "captions"} and len(caption5[0]["captions"]) == 5
  candidates = sources.open_split("mmret_world/tiny", "mm2mm_candidates", world_dir)
  assert set(candidates[0]) == {"id", "image", "text", "modality", "pool"}
  # A 5-caption split trains too (one caption drawn per visit), without ground truth.
  cfg = pipeline.default_input_config()
  cfg.data_dir = world_dir
  cfg.batch_size = 4
  cfg.train = [
      {"dataset": "mmret_world/tiny", "split": "train", "weight": 1.0},
      {"dataset": "mmret_world/tiny", "split": "caption5", "weight": 1.0},
  ]
  assert set(next(pipeline.make_train_iterator(cfg, seed=0))) == {"image", "text_ids", "text_mask"}
  items = [
      candidates[i] for i in range(len(candidates)) if candidates[i]["modality"] == "image,text"
  ][:5]
  batches = list(pipeline.eval_batches(items, input_cfg=cfg, batch_size=4))
  assert [b["valid"].sum() for b in batches] == [4, 1]
  assert set(batches[0]) == {"image", "text_ids", "text_mask", "valid", "index"}


def test_crop_boxes_stay_inside_and_respect_scale():
  from mmret.data import preprocess  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  fractions = []
  for _ in range(200):
    top, left, height, width = preprocess.sample_crop_box(
        40, 60, rng, scale=(0.3, 0.8), ratio=(3 / 4, 4 / 3)
    )
    assert 0 <= top and top + height <= 40 and 0 <= left and left + width <= 60
    fractions.append(height * width / (40 * 60))
  assert 0.27 < min(fractions) and max(fractions) < 0.85 and np.std(fractions) > 0.05
  # Unreachable ratios fall back to the largest centred box within the ratio range.
  assert preprocess.sample_crop_box(10, 100, rng, scale=(1.0, 1.0), ratio=(1.0, 2.0)) == (
      0,
      40,
      10,
      20,
  )
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  decoded = preprocess.decode_image(_png(gray), where="x")
  assert decoded.shape == (3, 4, 3) and (decoded[..., 2] == gray).all()
  with pytest.raises(ValueError, match="rec-9: no image bytes"):
    preprocess.decode_image(b"", where="rec-9")
