"""Embedding pass on 8 devices, the four protocols on hand-built data with known answers, run_evals.

A fake batch pipeline with ``eval_batches``'s signature turns items into vectors: an image is the
float32 bytes of a vector, a text is a sum of word vectors (``w<i>`` = i-th basis vector). The
predict_fn projects with params['w'] and L2-normalises, so every score below is known by hand.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmret import registry
from mmret.evals import embed, protocols, runner

DIM = 8


def _basis(i, dim=DIM):
  v = np.zeros(dim, np.float32)
  v[i] = 1.0
  return v


def _text_vector(text, dim=DIM):
  vector = np.zeros(dim, np.float32)
  for word in text.split():
    if not word.startswith("w"):
      raise ValueError(f"fake tokenizer: unknown word {word!r}")
    vector += _basis(int(word[1:]), dim)
  return vector


def fake_eval_batches(items, *, input_cfg, batch_size, process_index=0, process_count=1):
  """Same contract as mmret.data.pipeline.eval_batches: fixed-size batches, valid, index."""
  dim = input_cfg["dim"]
  rows = list(range(process_index, len(items), process_count))
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    batch = {"valid": np.zeros(batch_size, bool), "index": np.full(batch_size, -1, np.int32)}
    batch["valid"][: len(chunk)] = True
    batch["index"][: len(chunk)] = chunk
    first = items[chunk[0]]
    if "image" in first:
      batch["image"] = np.zeros((batch_size, dim), np.float32)
      for j, row in enumerate(chunk):
        batch["image"][j] = np.frombuffer(items[row]["image"], np.float32)
    if "text" in first:
      batch["text_vec"] = np.zeros((batch_size, dim), np.float32)
      for j, row in enumerate(chunk):
        batch["text_vec"][j] = _text_vector(items[row]["text"], dim)
    yield batch


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def predict_fn(params, batch):
  outputs = {}
  if "image" in batch:
    outputs["z_image"] = _normalize(batch["image"] @ params["w"])
  if "text_vec" in batch:
    outputs["z_text"] = _normalize(batch["text_vec"] @ params["w"])
  if "image" in batch and "text_vec" in batch:
    outputs["z_joint"] = _normalize(outputs["z_image"] + outputs["z_text"])
  return outputs


PARAMS = {"w": np.eye(DIM, dtype=np.float32)}
INPUT_CFG = {"dim": DIM}
COMMON = dict(input_cfg=INPUT_CFG, params=PARAMS, batches_fn=fake_eval_batches, batch_size=3)


def _image(i):
  return _basis(i).tobytes()


# --- embedding pass --------------------------------------------------------------------------


def _numpy_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


# 0: each batch read back before the next is dispatched (the CPU default); 2: two batches in
# flight (the accelerators' default) must give the same rows in the same order.
@pytest.mark.parametrize("in_flight", [0, 2])
def test_embed_items_on_8_devices_equals_single_device(in_flight):
  assert jax.local_device_count() == 8 and embed.local_mesh().size == 8
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(37, DIM)).astype(np.float32)
  words = [" ".join(f"w{j}" for j in rng.integers(0, DIM, 3)) for _ in range(37)]
  items = [
      {"id": str(i), "image": v.tobytes(), "text": t}
      for i, (v, t) in enumerate(zip(vectors, words))
  ]
  w = rng.normal(size=(DIM, DIM)).astype(np.float32)
  for modality, key in (("image", "z_image"), ("text", "z_text"), ("image,text", "z_joint")):
    got = embed.embed_items(
        predict_fn,
        [{k: item[k] for k in item if k == "id" or k in modality.split(",")} for item in items],
        modality,
        input_cfg=INPUT_CFG,
        batch_size=12,
        params={"w": w},
        batches_fn=fake_eval_batches,
        in_flight=in_flight,
    )
    # Single-device reference: the whole set in one batch on one device.
    batch = {}
    if "image" in modality:
      batch["image"] = vectors
    if "text" in modality:
      batch["text_vec"] = np.stack([_text_vector(t) for t in words])
    expected = np.asarray(jax.device_put(predict_fn({"w": w}, batch)[key], jax.devices()[0]))
    assert got.shape == (37, DIM)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_embed_items_rejects_lost_rows_and_unknown_modality():
  def dropping_batches(items, **kwargs):
    for batch in fake_eval_batches(items, **kwargs):
      batch["valid"][0] = False  # the first item of each batch goes missing
      yield batch

  items = [{"id": str(i), "text": "w1"} for i in range(5)]
  with pytest.raises(ValueError, match=r"missing items \[0, 3\]"):
    embed.embed_items(
        predict_fn,
        items,
        "text",
        input_cfg=INPUT_CFG,
        batch_size=3,
        params=PARAMS,
        batches_fn=dropping_batches,
    )
  with pytest.raises(ValueError, match="unknown modality 'audio'"):
    embed.embed_items(predict_fn, items, "audio", input_cfg=INPUT_CFG, batch_size=3)


def test_gather_processes_restores_order_across_uneven_shards(monkeypatch):
  """Two processes holding 3 and 2 rows: padding to the longest shard and trimming back."""
  z0, index0 = np.arange(6, dtype=np.float32).reshape(3, 2), np.array([4, 0, 2])
  z1, index1 = np.arange(10, 14, dtype=np.float32).reshape(2, 2), np.array([1, 3])
  other = iter([np.int64(2), np.int64(2), np.pad(z1, ((0, 1), (0, 0))), np.array([1, 3, -1])])

  def fake_allgather(x):
    return np.stack([np.asarray(x), next(other)])

  monkeypatch.setattr(embed.multihost_utils, "process_allgather", fake_allgather)
  z, index = embed._gather_processes(z0, index0, process_count=2)
  ordered = embed._restore_order(z, index, 5)
  expected = np.empty((5, 2), np.float32)
  expected[index0], expected[index1] = z0, z1
  np.testing.assert_array_equal(ordered, expected)


# --- caption5 --------------------------------------------------------------------------------


def _caption5_records():
  # Image i shows basis vector i; its captions say w<i>, except image 3's, which say w0.
  return [
      {"id": f"img{i}", "image": _image(i), "captions": [f"w{0 if i == 3 else i}"] * 5}
      for i in range(4)
  ]


def test_caption5_known_answer():
  got = protocols.evaluate_caption5(predict_fn, data=_caption5_records(), fold_size=2, **COMMON)
  # i->t: images 0-2 find a caption at rank 1; image 3 scores 0 with every caption and ties go
  # by caption order, so its captions (15-19) fall outside the top 10.
  assert got["i2t/recall@1"] == got["i2t/recall@5"] == got["i2t/recall@10"] == 75.0
  # t->i: image 3's captions rank image 0 first, then images 1, 2, 3 tied: rank 4.
  assert (got["t2i/recall@1"], got["t2i/recall@5"], got["t2i/recall@10"]) == (75.0, 100.0, 100.0)
  assert got["rsum"] == 500.0
  # Folds of 2 images: fold 1 = images 2, 3 and captions 10-19 (image 3 ranks its own at 6).
  assert got["folds/i2t/recall@1"] == 75.0 and got["folds/i2t/recall@10"] == 100.0
  assert got["folds/t2i/recall@1"] == 75.0 and got["folds/t2i/recall@5"] == 100.0


def test_caption5_names_record_without_captions():
  records = _caption5_records()
  records[2] = dict(records[2], captions=[])
  with pytest.raises(ValueError, match="caption5 record 'img2' has no captions"):
    protocols.evaluate_caption5(predict_fn, data=records, **COMMON)


# --- retrieval (M-BEIR) ----------------------------------------------------------------------


def _query(qid, modality, pool, task, positives, *, image=b"", text="", instruction=""):
  return {
      "id": qid,
      "image": image,
      "text": text,
      "modality": modality,
      "pool": pool,
      "task": task,
      "instruction": instruction,
      "positive_ids": positives,
      "candidate_ids": [],
      "negative_id": "",
      "negative_kind": "",
  }


def _candidate(cid, modality, pool="", *, image=b"", text=""):
  return {"id": cid, "image": image, "text": text, "modality": modality, "pool": pool}


def _mbeir():
  candidates = [
      _candidate("c0", "text", "A", text="w0"),
      _candidate("c1", "image", "A", image=_image(1)),
      _candidate("c2", "image,text", "B", image=_image(2), text="w3"),
      _candidate("c3", "text", "B", text="w4"),
      _candidate("c5", "text", "A", text="w4 w5"),
      _candidate("c6", "text", "A", text="w6"),
      _candidate("c7", "text", "A", text="w7"),
  ]
  queries = [
      _query("q0", "text", "A", "t2i", ["c1"], text="w1"),
      _query("q1", "image", "A", "i2t", ["c0"], image=_image(0)),
      _query("q2", "image,text", "B", "joint", ["c2"], image=_image(2), text="w3"),
      _query("q3", "text", "B", "joint", ["c3"], text="w4 w5"),
      _query("q4", "text", "A", "instructed", ["c6"], text="w6", instruction="w7 w7 w7"),
  ]
  return queries, candidates


def test_retrieval_local_and_global_pools():
  got = protocols.evaluate_retrieval(
      predict_fn, data=_mbeir(), ks=(1, 5), recall_k_by_pool={"B": 10}, **COMMON
  )
  for task in ("t2i", "i2t", "joint", "instructed"):
    assert got[f"local/{task}/recall@1"] == 100.0
  # In the global pool q3 ('w4 w5') finds c5 of pool A first; its positive c3 comes second.
  assert got["global/joint/recall@1"] == 50.0
  assert got["global/joint/recall@5"] == 100.0
  assert got["global/joint/recall@10"] == 100.0  # pool B's headline cut-off is reported too
  assert "local/t2i/recall@10" not in got or got["local/t2i/recall@10"] == 100.0
  assert got["local/average"] == got["global/average"] == 100.0
  assert not any("scann" in key for key in got)


def test_retrieval_instruction_prefix_changes_the_query():
  got = protocols.evaluate_retrieval(
      predict_fn, data=_mbeir(), ks=(1, 5), use_instruction=True, pools=("local",), **COMMON
  )
  # 'w7 w7 w7 w6' now prefers c7 over the positive c6.
  assert got["local/instructed/recall@1"] == 0.0
  assert got["local/instructed/recall@5"] == 100.0
  assert got["local/t2i/recall@1"] == 100.0
  assert not any(key.startswith("global/") for key in got)


def test_retrieval_names_unknown_positive_and_bad_modality():
  queries, candidates = _mbeir()
  queries[1] = dict(queries[1], positive_ids=["nope"])
  with pytest.raises(KeyError, match="query 'q1': positive ids \\['nope'\\]"):
    protocols.evaluate_retrieval(predict_fn, data=(queries, candidates), **COMMON)
  queries, candidates = _mbeir()
  candidates[3] = dict(candidates[3], modality="video")
  with pytest.raises(ValueError, match="candidate 'c3': modality 'video'"):
    protocols.evaluate_retrieval(predict_fn, data=(queries, candidates), **COMMON)
  queries, candidates = _mbeir()
  del queries[2]["pool"]
  with pytest.raises(KeyError, match=r"query #2 \(id 'q2'\): record has no field 'pool'"):
    protocols.evaluate_retrieval(predict_fn, data=(queries, candidates), **COMMON)


# --- mm2mm -----------------------------------------------------------------------------------


def _pair(cid, image, text):
  return _candidate(cid, "image,text", image=_image(image), text=text)


def _mm2mm(num_distractors=0, seed=0):
  candidates = [
      _pair("a0", 0, "w1"),  # the anchor itself, ranked first unless excluded
      _pair("p0", 0, "w1"),  # identical to a0: sim 1
      _pair("n0", 0, "w2"),  # sim 0.5
      _pair("n1", 3, "w4"),  # identical to a1: sim 1
      _pair("p1", 3, "w5"),  # sim 0.5
      _pair("p2", 6, "w7"),
  ]
  rng = np.random.default_rng(seed)
  for i in range(num_distractors):
    vector = rng.normal(size=DIM).astype(np.float32)
    candidates.append(
        {
            "id": f"d{i}",
            "image": vector.tobytes(),
            "text": f"w{i % DIM}",
            "modality": "image,text",
            "pool": "",
        }
    )
  queries = [
      dict(
          _query("a0", "image,text", "", "mm2mm", ["p0"], image=_image(0), text="w1"),
          negative_id="n0",
          negative_kind="intersection",
      ),
      dict(
          _query("a1", "image,text", "", "mm2mm", ["p1"], image=_image(3), text="w4"),
          negative_id="n1",
          negative_kind="text_only",
      ),
      _query("a2", "image,text", "", "mm2mm", ["p2"], image=_image(6), text="w7"),
  ]
  return queries, candidates


def test_mm2mm_known_answer():
  got = protocols.evaluate_mm2mm(predict_fn, data=_mm2mm(), **COMMON)
  assert got["recall@1"] == pytest.approx(200 / 3)  # a1's negative outranks its positive
  assert got["recall@5"] == got["recall@10"] == 100.0
  assert got["mR"] == pytest.approx((200 / 3 + 200) / 3)
  assert got["precision"] == 50.0  # a2 has no negative
  assert got["precision/intersection"] == 100.0 and got["precision/text_only"] == 0.0
  assert got["avg"] == pytest.approx((got["mR"] + 50.0) / 2)
  # Without excluding the anchor's own copy, a0 finds itself first.
  kept = protocols.evaluate_mm2mm(predict_fn, data=_mm2mm(), exclude_self=False, **COMMON)
  assert kept["recall@1"] == pytest.approx(100 / 3)


def test_mm2mm_rankings_leave_out_the_anchor(tmp_path):
  protocols.evaluate_mm2mm(
      predict_fn, data=_mm2mm(), workdir=str(tmp_path), save_rankings=True, **COMMON
  )
  with open(tmp_path / "rankings.jsonl") as f:
    rankings = [json.loads(line) for line in f]
  assert [r["query_id"] for r in rankings] == ["a0", "a1", "a2"]
  assert rankings[0]["candidate_ids"][0] == "p0" and "a0" not in rankings[0]["candidate_ids"]
  assert len(rankings[0]["candidate_ids"]) == len(rankings[0]["scores"]) == 5
  assert rankings[1]["candidate_ids"][:2] == ["n1", "p1"]
  assert rankings[1]["scores"][:2] == pytest.approx([1.0, 0.5])


def test_mm2mm_with_scann_reports_its_recall():
  # Searching every partition and re-ordering a third of the pool exactly recovers the exact
  # top-k; on 8-d toy data, partial searches and coarse hashing depend on k-means' random start.
  data = _mm2mm(num_distractors=3000)
  options = dict(COMMON, batch_size=512)
  got = protocols.evaluate_mm2mm(
      predict_fn,
      data=data,
      **options,
      search=dict(
          method="scann", recall_samples=3, scann=dict(leaves_to_search=1000, reorder=1000)
      ),
  )
  exact = protocols.evaluate_mm2mm(predict_fn, data=data, **options)
  assert got["scann_recall@11"] == 100.0
  assert got == dict(exact, **{"scann_recall@11": 100.0})


# --- mmeb ------------------------------------------------------------------------------------


def _mmeb():
  candidates = [
      _candidate("c0", "text", text="w0"),
      _candidate("c1", "text", text="w1"),
      _candidate("c2", "image", image=_image(3)),
      _candidate("c3", "image", image=_image(2)),
      _candidate("c4", "text", text="w5"),
      _candidate("c5", "text", text="w5"),
      _candidate("unused", "text", text="w0"),
  ]
  queries = [
      dict(_query("q0", "text", "", "A", [], text="w0"), candidate_ids=["c0", "c1"]),
      dict(_query("q1", "image", "", "A", [], image=_image(2)), candidate_ids=["c2", "c3"]),
      dict(
          _query("q2", "text", "", "B", [], text="w1", instruction="w0 w0 w0"),
          candidate_ids=["c1", "c0"],
      ),
      dict(_query("q3", "text", "", "A", [], text="w5"), candidate_ids=["c4", "c5"]),  # a tie
  ]
  return queries, candidates


def test_mmeb_hit_at_1_known_answer(tmp_path):
  got = protocols.evaluate_mmeb(predict_fn, data=_mmeb(), **COMMON)
  assert got["A/hit@1"] == pytest.approx(100 / 3)  # q0 hit; q1 wrong; q3 tie = miss
  assert got["B/hit@1"] == 0.0  # the instruction pulls q2 to c0
  assert got["average/hit@1"] == pytest.approx(50 / 3)
  plain = protocols.evaluate_mmeb(
      predict_fn,
      data=_mmeb(),
      use_instruction=False,
      workdir=str(tmp_path),
      save_rankings=True,
      **COMMON,
  )
  assert plain["B/hit@1"] == 100.0
  with open(tmp_path / "rankings.jsonl") as f:
    rankings = [json.loads(line) for line in f]
  assert rankings[1]["candidate_ids"] == ["c3", "c2"]  # q1 prefers the wrong image


def test_mmeb_names_unknown_candidate():
  queries, candidates = _mmeb()
  queries[0] = dict(queries[0], candidate_ids=["c0", "ghost"])
  with pytest.raises(KeyError, match="query 'q0': candidate ids \\['ghost'\\]"):
    protocols.evaluate_mmeb(predict_fn, data=(queries, candidates), **COMMON)


# --- run_evals -------------------------------------------------------------------------------


def _open_split(dataset, split, data_dir):
  assert dataset == "toy" and data_dir == "/data"
  splits = {
      "caption5": _caption5_records(),
      "mb_queries": _mbeir()[0],
      "mb_candidates": _mbeir()[1],
  }
  if split not in splits:
    raise KeyError(f"no split {split!r}")
  return splits[split]


EVALS = {
    "flickr": dict(type="caption5", dataset="toy", split="caption5", every=2, batch_size=4),
    "mbeir": dict(
        type="retrieval",
        dataset="toy",
        split="mb",
        every=0,
        batch_size=4,
        ks=(1, 5),
        recall_k_by_pool={"B": 10},
        save_rankings=True,
    ),
}


def test_run_evals_schedules_names_and_writes_reports(tmp_path):
  run = dict(
      params=PARAMS,
      data_dir="/data",
      open_split=_open_split,
      batches_fn=fake_eval_batches,
      evaluators=registry.evaluator,
  )
  assert runner.run_evals(predict_fn, EVALS, INPUT_CFG, 3, str(tmp_path), **run) == {}
  at_2 = runner.run_evals(predict_fn, EVALS, INPUT_CFG, 2, str(tmp_path), **run)
  assert at_2["eval/flickr/rsum"] == 500.0
  assert not any(key.startswith("eval/mbeir/") for key in at_2)
  final = runner.run_evals(predict_fn, EVALS, INPUT_CFG, 4, str(tmp_path), final=True, **run)
  assert final["eval/mbeir/global/joint/recall@1"] == 50.0
  with open(tmp_path / "eval" / "flickr.json") as f:
    record = json.load(f)
  assert [entry["step"] for entry in record["history"]] == [2, 4]
  assert record["history"][-1]["metrics"]["rsum"] == 500.0
  for name in ("flickr", "mbeir"):
    for suffix in ("json", "md", "png"):
      assert os.path.getsize(tmp_path / "eval" / f"{name}.{suffix}") > 0
  # Ranked lists land in the evaluation's own directory.
  with open(tmp_path / "eval" / "mbeir" / "rankings_global.jsonl") as f:
    rankings = {line["query_id"]: line for line in map(json.loads, f)}
  assert rankings["q3"]["candidate_ids"][:2] == ["c5", "c3"]
  assert rankings["q3"]["scores"][0] == pytest.approx(1.0)
  with open(tmp_path / "eval" / "mbeir" / "rankings_local.jsonl") as f:
    local = {line["query_id"]: line for line in map(json.loads, f)}
  assert local["q3"]["candidate_ids"] == ["c3", "c2"]  # pool B only
  assert not (tmp_path / "eval" / "flickr").exists()  # rankings not asked for


def test_run_evals_rejects_unknown_fields():
  bad = {"flickr": dict(EVALS["flickr"], fold_sise=1000)}
  with pytest.raises(ValueError, match=r"config.evals.flickr: unknown fields \['fold_sise'\]"):
    runner.run_evals(
        predict_fn,
        bad,
        INPUT_CFG,
        2,
        None,
        params=PARAMS,
        data_dir="/data",
        open_split=_open_split,
        batches_fn=fake_eval_batches,
        evaluators=registry.evaluator,
    )
  with pytest.raises(KeyError, match="unknown evaluator type 'nocaps'"):
    runner.run_evals(
        predict_fn,
        {"x": dict(type="nocaps", dataset="toy", split="s", every=1)},
        INPUT_CFG,
        2,
        None,
        open_split=_open_split,
        evaluators=registry.evaluator,
    )
