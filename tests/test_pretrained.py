"""model.init: spec parsing, placement of converted weights, and errors naming the culprits.

Runs without torch: checkpoints are numpy archives in the Hugging Face BERT layout.
"""

import functools

import jax
import numpy as np
import pytest

from configs import clip as clip_config
from mmret import step as step_lib
from mmret import train
from mmret.models import pretrained
from mmret.models.retrieval import build_model
from mmret import config_lib

WIDTH, DEPTH, MLP, VOCAB, MAX_POS, TEXT_LEN = 16, 2, 32, 20, 24, 8


def _bert_tensors(depth=DEPTH, width=WIDTH, seed=0):
  rng = np.random.default_rng(seed)
  t = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  tensors = {
      "embeddings.word_embeddings.weight": t(VOCAB, width),
      "embeddings.position_embeddings.weight": t(MAX_POS, width),
      "embeddings.token_type_embeddings.weight": t(2, width),
      "embeddings.LayerNorm.weight": t(width),
      "embeddings.LayerNorm.bias": t(width),
      "embeddings.position_ids": np.arange(MAX_POS)[None],
      "pooler.dense.weight": t(width, width),
      "pooler.dense.bias": t(width),
  }
  for i in range(depth):
    s = f"encoder.layer.{i}"
    for name, (out_dim, in_dim) in {
        "attention.self.query": (width, width),
        "attention.self.key": (width, width),
        "attention.self.value": (width, width),
        "attention.output.dense": (width, width),
        "intermediate.dense": (MLP, width),
        "output.dense": (width, MLP),
    }.items():
      tensors[f"{s}.{name}.weight"] = t(out_dim, in_dim)
      tensors[f"{s}.{name}.bias"] = t(out_dim)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      tensors[f"{s}.{name}.weight"], tensors[f"{s}.{name}.bias"] = t(width), t(width)
  return tensors


def _save(tmp_path, tensors, name="bert.npz"):
  path = tmp_path / name
  np.savez(path, **tensors)
  return str(path)


def _model_cfg(depth=DEPTH, width=WIDTH):
  cfg = config_lib.model_config("tiny")
  cfg.text.update(kind="bert", width=width, depth=depth, heads=2, mlp_dim=MLP)
  cfg.update(embed_dim=width, text_pool="mean")
  return cfg


@functools.lru_cache(maxsize=None)
def _params():
  model = build_model(_model_cfg(), vocab_size=VOCAB, max_text_len=TEXT_LEN)
  batch = {
      "image": np.zeros((1, 32, 32, 3), np.float32),
      "text_ids": np.zeros((1, TEXT_LEN), np.int32),
      "text_mask": np.ones((1, TEXT_LEN), bool),
  }
  return jax.jit(lambda key: model.init(key, batch)["params"])(jax.random.PRNGKey(0))


def test_parse_spec():
  entries = pretrained.parse_spec(
      " clip:/a/b.pt@image, bert:/m@x/model.safetensors ," "efficientnet_lite0:/e.pth"
  )
  assert entries == [
      pretrained.InitEntry("clip", "/a/b.pt", ("image",)),
      pretrained.InitEntry("bert", "/m@x/model.safetensors", ("text",)),
      pretrained.InitEntry("efficientnet_lite0", "/e.pth", ("image",)),
  ]
  assert pretrained.parse_spec(("clip:/c.pt",))[0].targets == ("image", "text")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpt:/x.pt", "unknown checkpoint kind 'gpt'"),
        ("/x.pt", "not of the form kind:path"),
        ("bert:/x.pt@image", "has no 'image' tower"),
        ("vit:/does/not/exist.safetensors", "does not exist"),
        ("", "names no checkpoint"),
    ],
)
def test_bad_specs_are_named(spec, message):
  with pytest.raises(pretrained.CheckpointError, match=message):
    pretrained.load_into(_params(), spec)


def test_weights_land_in_the_right_places(tmp_path):
  tensors = _bert_tensors()
  init = _params()
  params = pretrained.load_into(init, f"bert:{_save(tmp_path, tensors)}")
  text = params["text_tower"]
  np.testing.assert_array_equal(
      text["block1"]["attn"]["key"]["kernel"],
      tensors["encoder.layer.1.attention.self.key.weight"].T,
  )
  np.testing.assert_array_equal(
      text["block0"]["ln_mlp"]["scale"], tensors["encoder.layer.0.output.LayerNorm.weight"]
  )
  # Positions are cut to the configured text length; the square projection is the identity.
  np.testing.assert_array_equal(
      text["pos_embed"][0], tensors["embeddings.position_embeddings.weight"][:TEXT_LEN]
  )
  np.testing.assert_array_equal(params["text_proj"]["kernel"], np.eye(WIDTH))
  # Everything outside the text tower keeps its initial value.
  for a, b in zip(jax.tree.leaves(params["image_tower"]), jax.tree.leaves(init["image_tower"])):
    np.testing.assert_array_equal(a, b)


def test_missing_and_unused_tensors_are_listed(tmp_path):
  tensors = _bert_tensors()
  del tensors["encoder.layer.1.attention.self.value.bias"]
  tensors["encoder.layer.0.adapter.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(pretrained.CheckpointError) as error:
    pretrained.load_into(_params(), f"bert:{_save(tmp_path, tensors)}")
  message = str(error.value)
  assert "tensors missing from the checkpoint: encoder.layer.1.attention.self.value.bias" in message
  assert (
      "model parameters the checkpoint does not set: text_tower/block1/attn/value/bias" in message
  )
  assert "checkpoint tensors not used: encoder.layer.0.adapter.weight" in message


def test_shape_and_depth_mismatches_are_listed(tmp_path):
  path = _save(tmp_path, _bert_tensors(depth=3, width=24))
  with pytest.raises(pretrained.CheckpointError) as error:
    pretrained.load_into(_params(), f"bert:{path}")
  message = str(error.value)
  assert "text_tower/block0/attn/query/kernel (model (16, 16), checkpoint (24, 24))" in message
  assert "checkpoint parameters the model does not have: text_tower/block2/" in message


def test_wrong_kind_for_the_file_is_reported(tmp_path):
  path = _save(tmp_path, _bert_tensors())
  with pytest.raises(
      pretrained.CheckpointError,
      match="tensors missing from the checkpoint: " "embeddings.cls_token",
  ):
    pretrained.load_into(_params(), f"vit:{path}")


def test_two_entries_setting_one_tower_conflict(tmp_path):
  path = _save(tmp_path, _bert_tensors())
  with pytest.raises(pretrained.CheckpointError, match="both set"):
    pretrained.load_into(_params(), f"bert:{path},bert:{path}")


def test_train_setup_starts_from_model_init(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text(
      "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(VOCAB - 4)]) + "\n"
  )
  tensors = _bert_tensors()
  config = clip_config.get_config("evals=false")
  config.input.tokenizer = f"wordpiece:{vocab}"
  config.input.max_text_len = TEXT_LEN
  config.model = _model_cfg()
  config.model.init = f"bert:{_save(tmp_path, tensors)}"
  setup = train.Setup(config)
  state = setup.init_state(config, step_lib.DeviceMapping("shard_map"))
  np.testing.assert_array_equal(
      jax.device_get(state.params["text_tower"]["token_embed"]["embedding"]),
      tensors["embeddings.word_embeddings.weight"],
  )
