"""CoVR: the CSV + frame-folder importer, and the protocol against a numpy reference.

Frames are 1 x DIM grayscale PNGs whose pixels are the frame's vector; a stand-in batch pipeline
decodes them, and texts are sums of word vectors (``w<i>`` = i-th basis vector). The stand-in
model projects with a random matrix and L2-normalises, so the numpy reference below recomputes
every embedding, score and rank from the formulas.
"""

import csv
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmret import prepare, registry
from mmret.data import importers, sources
from mmret.data.importers import covr as covr_import
from mmret.data.importers import records
from mmret.evals import covr, runner

DIM = 6
W = np.random.default_rng(7).normal(size=(DIM, DIM)).astype(np.float32)
PARAMS = {"w": W}
INPUT_CFG = {"dim": DIM}
COMMON = dict(input_cfg=INPUT_CFG, params=PARAMS, batch_size=8)

# ----------------------------------------------------------------------------------------------
# Stand-in model and batches.


def _png(pixels) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8).reshape(1, DIM), mode="L").save(out, format="PNG")
  return out.getvalue()


def _frame_vector(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image, np.float64).reshape(-1) / 255.0


def _text_vector(text: str) -> np.ndarray:
  vector = np.zeros(DIM)
  for word in text.split():
    vector[int(word[1:])] += 1.0
  return vector


def fake_batches(items, *, input_cfg, batch_size, process_index=0, process_count=1):
  """eval_batches' contract: fixed-size batches with ``valid`` and ``index``."""
  rows = list(range(process_index, len(items), process_count))
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    batch = {"valid": np.zeros(batch_size, bool), "index": np.full(batch_size, -1, np.int32)}
    batch["valid"][: len(chunk)] = True
    batch["index"][: len(chunk)] = chunk
    if "image" in items[chunk[0]]:
      batch["image"] = np.zeros((batch_size, input_cfg["dim"]), np.float32)
      for j, row in enumerate(chunk):
        batch["image"][j] = _frame_vector(items[row]["image"])
    if "text" in items[chunk[0]]:
      batch["text_vec"] = np.zeros((batch_size, input_cfg["dim"]), np.float32)
      for j, row in enumerate(chunk):
        batch["text_vec"][j] = _text_vector(items[row]["text"])
    yield batch


def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def predict_fn(params, batch):
  outputs = {}
  if "image" in batch:
    outputs["z_image"] = _unit(batch["image"] @ params["w"])
  if "text_vec" in batch:
    outputs["z_text"] = _unit(batch["text_vec"] @ params["w"])
  if "image" in batch and "text_vec" in batch:
    outputs["z_joint"] = _unit(outputs["z_image"] + outputs["z_text"])
  return outputs


# ----------------------------------------------------------------------------------------------
# The numpy reference of the protocol.


def _np_unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_recall(queries, candidates, ks, *, query_embedding, exclude_reference):
  """Recall@k (percent) and mR computed from the formulas in float64."""
  w = W.astype(np.float64)
  image_z = lambda f: _np_unit(_frame_vector(f) @ w)  # noqa: E731
  text_z = lambda t: _np_unit(_text_vector(t) @ w)  # noqa: E731
  video_z = lambda frames: _np_unit(np.mean([image_z(f) for f in frames], axis=0))  # noqa: E731
  cand = np.stack([video_z(c["image"]) for c in candidates])
  cand_ids = [c["id"] for c in candidates]
  ranks = []
  for query in queries:
    if query_embedding == "mean_of_joint":
      joint = [_np_unit(image_z(f) + text_z(query["text"])) for f in query["image"]]
      z = _np_unit(np.mean(joint, axis=0))
    else:
      z = _np_unit(video_z(query["image"]) + text_z(query["text"]))
    scores = cand @ z
    target = cand_ids.index(query["target_id"])
    others = [
        j
        for j in range(len(cand_ids))
        if j != target and not (exclude_reference and cand_ids[j] == query["reference_id"])
    ]
    # Random data: no score of another candidate is within 1e-4 of the target's (no tie rule).
    assert np.min(np.abs(scores[others] - scores[target])) > 1e-4
    ranks.append(1 + int(np.sum(scores[others] > scores[target])))
  ranks = np.asarray(ranks)
  out = {f"recall@{k}": 100.0 * np.mean(ranks <= k) for k in ks}
  out["mR"] = float(np.mean([out[f"recall@{k}"] for k in ks]))
  return out


def _made_up_set(seed=0, num_videos=9, num_queries=12):
  """Candidates v0..v5 (1 to 4 frames each); queries reference any of v0..v8."""
  rng = np.random.default_rng(seed)
  frames = {
      f"v{i}": [_png(rng.integers(0, 256, DIM)) for _ in range(1 + i % 4)]
      for i in range(num_videos)
  }
  candidates = [{"id": f"v{i}", "image": frames[f"v{i}"]} for i in range(6)]
  queries = []
  for n in range(num_queries):
    reference, target = rng.choice(num_videos), rng.choice(6)
    if reference == target:
      reference = (target + 1) % num_videos
    words = " ".join(f"w{j}" for j in rng.integers(0, DIM, 2))
    queries.append(
        {
            "id": f"row {n + 1}",
            "image": frames[f"v{reference}"],
            "text": words,
            "reference_id": f"v{reference}",
            "target_id": f"v{target}",
        }
    )
  return queries, candidates


# ----------------------------------------------------------------------------------------------
# The protocol.


@pytest.mark.parametrize("query_embedding", ["mean_of_joint", "fusion_of_means"])
def test_protocol_matches_numpy_reference(query_embedding):
  queries, candidates = _made_up_set()
  ks = (1, 2, 3, 5)
  got = {}
  for exclude in (True, False):
    got[exclude] = covr.evaluate_covr(
        predict_fn,
        data=(queries, candidates),
        ks=ks,
        query_embedding=query_embedding,
        exclude_reference=exclude,
        batches_fn=fake_batches,
        **COMMON,
    )
    expected = reference_recall(
        queries, candidates, ks, query_embedding=query_embedding, exclude_reference=exclude
    )
    assert got[exclude].keys() == expected.keys()
    for key, value in expected.items():
      assert got[exclude][key] == pytest.approx(value, abs=1e-9), (exclude, key)
  # The set is built so that masking the reference video changes the result.
  assert got[True]["mR"] > got[False]["mR"]


def test_protocol_default_metrics_rankings_and_errors(tmp_path):
  queries, candidates = _made_up_set(seed=1)
  got = covr.evaluate_covr(
      predict_fn,
      data=(queries, candidates),
      batches_fn=fake_batches,
      save_rankings=True,
      workdir=str(tmp_path),
      **COMMON,
  )
  expected = reference_recall(
      queries,
      candidates,
      (1, 5, 10, 50),
      query_embedding="mean_of_joint",
      exclude_reference=True,
  )
  assert sorted(got) == sorted(expected)  # recall@1/5/10/50 and mR
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, abs=1e-9)
  with open(tmp_path / "rankings.jsonl") as f:
    rankings = [json.loads(line) for line in f]
  assert [r["query_id"] for r in rankings] == [q["id"] for q in queries]
  for query, ranking in zip(queries, rankings):
    assert query["reference_id"] not in ranking["candidate_ids"]

  bad = [dict(queries[0], target_id="nope")] + queries[1:]
  with pytest.raises(KeyError, match="'row 1': target video 'nope' is not a candidate"):
    covr.evaluate_covr(predict_fn, data=(bad, candidates), batches_fn=fake_batches, **COMMON)
  empty = [candidates[0]] + [dict(candidates[1], image=[])] + candidates[2:]
  with pytest.raises(ValueError, match=r"covr candidate #1 \(id 'v1'\).*no frames"):
    covr.evaluate_covr(predict_fn, data=(queries, empty), batches_fn=fake_batches, **COMMON)
  with pytest.raises(ValueError, match="query_embedding must be one of"):
    covr.evaluate_covr(predict_fn, data=(queries, candidates), query_embedding="late", **COMMON)
  assert registry.evaluator("covr") is covr.COVR


# ----------------------------------------------------------------------------------------------
# The importer.

CSV_COLUMNS = ["video1", "pth1", "edit", "video2", "pth2", "scores", "txt1", "txt2"]


def _write_frames(root, video_id, count, seed, names=None):
  """``count`` frames ``0.png``... (unpadded names) of random pixels; returns name -> bytes."""
  rng = np.random.default_rng(seed)
  folder = os.path.join(root, video_id)
  os.makedirs(folder, exist_ok=True)
  written = {}
  for i in range(count):
    name = names[i] if names else f"{i}.png"
    data = _png(rng.integers(0, 256, DIM))
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)
    written[name] = data
  with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write("not a frame")
  return written


def _write_csv(path, rows, columns=CSV_COLUMNS):
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({c: row.get(c, "x") for c in columns})


def _row(reference, edit, target):
  return {"pth1": reference, "edit": edit, "pth2": target, "scores": "[0.1, 0.2]"}


def _covr_source(tmp_path):
  """A frames root with WebVid-like ids and a CSV exercising every skip reason."""
  root = str(tmp_path / "frames")
  a = _write_frames(root, "p0/vA", 12, seed=1)  # 12 frames: 1, 4, 7, 10 are sampled
  b = _write_frames(root, "p0/vB", 3, seed=2)  # fewer than 4: all kept
  c = _write_frames(root, "p1/vC", 4, seed=3)
  with open(os.path.join(root, "p1/vC/2.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not really")  # corrupt: left out of vC, counted
  e = _write_frames(root, "p1/vE", 5, seed=4)
  frames = {
      "p0/vA": [a[f"{i}.png"] for i in (1, 4, 7, 10)],
      "p0/vB": list(b.values()),
      "p1/vC": [c["0.png"], c["1.png"], c["3.png"]],
      "p1/vE": [e[f"{i}.png"] for i in (0, 1, 2, 3)],  # 5 frames -> runs 0-0, 1-1, 2-2, 3-4
  }
  csv_path = str(tmp_path / "webvid8m-covr_test.csv")
  _write_csv(
      csv_path,
      [
          _row("p0/vA", "w1 w2", "p0/vB"),  # row 1
          _row("p0/vB", "w3", "p1/vC"),  # row 2
          _row("p1/vC", "w0 w4", "p0/vA"),  # row 3
          _row("p1/vE", "w5", "p9/vD"),  # row 4: target folder missing
          _row("p9/vD", "w1", "p0/vA"),  # row 5: reference folder missing
          _row("p1/vE", "w2", "p1/vE"),  # row 6: reference is the target
          _row("p0/vB", " ", "p0/vA"),  # row 7: empty edit
          _row("p0/vA", "w4 w4", "p1/vE"),  # row 8
      ],
  )
  return root, csv_path, frames


def test_sample_frame_indices_and_frame_order(tmp_path):
  assert covr_import.sample_frame_indices(10, 4) == [0, 3, 5, 8]
  assert covr_import.sample_frame_indices(12, 4) == [1, 4, 7, 10]
  assert covr_import.sample_frame_indices(5, 1) == [2]
  assert covr_import.sample_frame_indices(3, 4) == [0, 1, 2]
  assert covr_import.sample_frame_indices(0, 4) == []
  _write_frames(str(tmp_path), "v", 3, seed=0, names=["f10.jpg", "f2.png", "f1.png"])
  assert covr_import.frame_files(str(tmp_path / "v")) == ["f1.png", "f2.png", "f10.jpg"]


def test_prepare_covr_end_to_end_and_protocol(tmp_path):
  root, csv_path, frames = _covr_source(tmp_path)
  out = str(tmp_path / "out")
  argv = ["--format=covr", f"--src={root}", f"--annotations={csv_path}", f"--out={out}"]
  assert prepare.main(argv) == 0
  with open(os.path.join(out, "import_summary.json")) as f:
    summary = json.load(f)
  candidates_info, queries_info = (
      summary["splits"]["test_candidates"],
      summary["splits"]["test_queries"],
  )
  assert (candidates_info["written"], candidates_info["skipped"]) == (4, 1)
  assert {r: p["count"] for r, p in candidates_info["problems"].items()} == {
      "missing_video": 1,
      "corrupt_image": 1,  # vC's frame, counted once for the candidate vC
  }
  assert candidates_info["problems"]["missing_video"]["examples"][0]["id"] == "p9/vD"
  assert (queries_info["written"], queries_info["skipped"]) == (4, 4)
  assert {r: p["count"] for r, p in queries_info["problems"].items()} == {
      "positive_not_in_pool": 1,
      "missing_video": 1,
      "same_video": 1,
      "empty_edit": 1,
      "corrupt_image": 1,  # row 3's reference vC
  }
  problem_rows = {
      reason: [e["id"] for e in problem["examples"]]
      for reason, problem in queries_info["problems"].items()
  }
  assert problem_rows["positive_not_in_pool"] == ["row 4"]
  assert problem_rows["missing_video"] == ["row 5"]
  assert problem_rows["same_video"] == ["row 6"]
  assert problem_rows["empty_edit"] == ["row 7"]
  assert queries_info["problems"]["empty_edit"]["examples"][0]["file"] == csv_path

  # Read back the way evaluations read datasets.
  candidates = sources.open_split(out, "test_candidates")
  queries = sources.open_split(out, "test_queries")
  got_candidates = {candidates[i]["id"]: candidates[i] for i in range(len(candidates))}
  assert sorted(got_candidates) == ["p0/vA", "p0/vB", "p1/vC", "p1/vE"]
  for video_id, record in got_candidates.items():
    assert list(record["image"]) == frames[video_id], video_id
  got_queries = [queries[i] for i in range(len(queries))]
  assert [(q["id"], q["reference_id"], q["text"], q["target_id"]) for q in got_queries] == [
      ("row 1", "p0/vA", "w1 w2", "p0/vB"),
      ("row 2", "p0/vB", "w3", "p1/vC"),
      ("row 3", "p1/vC", "w0 w4", "p0/vA"),
      ("row 8", "p0/vA", "w4 w4", "p1/vE"),
  ]
  for query in got_queries:
    assert list(query["image"]) == frames[query["reference_id"]], query["id"]

  # The protocol on the imported set, through the evaluation runner.
  ks = (1, 2, 3)
  metrics = runner.run_evals(
      predict_fn,
      {"covr": dict(type="covr", dataset=out, split="test", ks=ks, batch_size=8)},
      INPUT_CFG,
      step=0,
      workdir=None,
      evaluators=registry.evaluator,
      params=PARAMS,
      final=True,
      batches_fn=fake_batches,
  )
  expected = reference_recall(
      got_queries,
      [got_candidates[k] for k in sorted(got_candidates)],
      ks,
      query_embedding="mean_of_joint",
      exclude_reference=True,
  )
  assert sorted(metrics) == sorted(f"eval/covr/{key}" for key in expected)
  for key, value in expected.items():
    assert metrics[f"eval/covr/{key}"] == pytest.approx(value, abs=1e-9), key

  # --on_error=fail stops on the first bad record, naming it.
  failed = str(tmp_path / "failed")
  assert prepare.main(argv[:-1] + [f"--out={failed}", "--on_error=fail"]) == 1
  assert not os.path.exists(failed)


def _built(plan, split):
  """{id: record or BadRecord} of one split of a plan, built without writing a dataset."""
  built = {}
  for record_id, _, build in plan.sources[split]():
    try:
      built[record_id] = build()
    except records.BadRecord as problem:
      built[record_id] = problem
  return built


def test_columns_num_frames_and_missing_column(tmp_path):
  root, _, _ = _covr_source(tmp_path)
  csv_path = str(tmp_path / "cc-covr.csv")
  _write_csv(
      csv_path,
      [{"ref": "p0/vA", "mod": "w1", "tgt": "p0/vB"}],
      columns=["ref", "mod", "tgt"],
  )
  problems = records.ProblemLog()
  plan = importers.plan_import(
      "covr",
      root,
      problems,
      annotations=csv_path,
      num_frames=2,
      columns=("reference=ref", "edit=mod", "target=tgt"),
  )
  assert list(plan.sources) == ["test_candidates", "test_queries"]
  candidates = _built(plan, "test_candidates")
  queries = _built(plan, "test_queries")
  assert list(candidates) == ["p0/vB"] and len(candidates["p0/vB"]["image"]) == 2
  # 12 frames in 2 runs of 6: the middle frames 2 and 8.
  assert queries["row 1"]["image"] == [
      open(os.path.join(root, "p0/vA", name), "rb").read() for name in ("2.png", "8.png")
  ]
  assert queries["row 1"]["text"] == "w1" and queries["row 1"]["target_id"] == "p0/vB"

  with pytest.raises(records.SchemaError, match=r"cc-covr\.csv: no column 'pth1' \(the reference"):
    importers.plan_import("covr", root, problems, annotations=csv_path)
  with pytest.raises(records.SchemaError, match=r"cc-covr\.csv: no column 'edit' \(the edit"):
    importers.plan_import(
        "covr", root, problems, annotations=csv_path, columns=("reference=ref", "target=tgt")
    )
  with pytest.raises(ValueError, match=r"unknown roles \['query'\]"):
    importers.plan_import("covr", root, problems, annotations=csv_path, columns=("query=ref",))


def test_video_files_need_a_decoder(tmp_path, monkeypatch):
  root = tmp_path / "videos"
  (root / "p0").mkdir(parents=True)
  for name in ("vA.mp4", "vB.mp4"):
    (root / "p0" / name).write_bytes(b"\x00\x00\x00\x18ftypmp42")
  csv_path = str(tmp_path / "covr.csv")
  _write_csv(csv_path, [_row("p0/vA", "w1", "p0/vB")])
  problems = records.ProblemLog()
  monkeypatch.setattr(covr_import, "video_decoder", lambda: None)
  with pytest.raises(records.SchemaError, match=r"vA\.mp4.*install PyAV.*extract each video's"):
    importers.plan_import("covr", str(root), problems, annotations=csv_path)

  decoded = []

  def fake_decoder(path, num_frames):
    decoded.append((os.path.basename(path), num_frames))
    return [_png([len(decoded)] * DIM)] * num_frames

  monkeypatch.setattr(covr_import, "video_decoder", lambda: fake_decoder)
  plan = importers.plan_import("covr", str(root), problems, annotations=csv_path, num_frames=3)
  candidates = _built(plan, "test_candidates")
  queries = _built(plan, "test_queries")
  assert decoded == [("vB.mp4", 3), ("vA.mp4", 3)]
  assert len(candidates["p0/vB"]["image"]) == 3 and len(queries["row 1"]["image"]) == 3
  assert queries["row 1"]["image"][0] != candidates["p0/vB"]["image"][0]
