"""Feedback a person reads: progress lines, evaluate's printed headline, training-curve PNGs,
faceted recall plots, natural metric order and the SOLAR overlay legend."""

import io
import json
import math
import os

import numpy as np
import pytest
from absl.testing import flagsaver
from PIL import Image

from mmret import evaluate, metrics_writer, progress
from mmret.data.importers import records, schema, writer
from mmret.evals import embed, report, search
from mmret.recipes.solar import evaluator as solar_evaluator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_SIGNATURE
  Image.open(io.BytesIO(data)).verify()  # checks the chunks' CRCs
  return Image.open(io.BytesIO(data)).convert("RGB")


def _rgb(colour):
  if isinstance(colour, str):
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
  return tuple(colour)


def _count(pixels, colour):
  return int(np.all(pixels == _rgb(colour), axis=-1).sum())


# --- progress ---------------------------------------------------------------------------------


def test_progress_rate_eta_and_line_spacing_on_a_fake_clock():
  clock, lines = FakeClock(), []
  counter = progress.Progress(
      "importing", 10, unit="records", every_s=5, clock=clock, log=lines.append
  )
  assert lines == ["importing (10 records) ..."]
  clock.now += 2  # 2 s: 4 records -> 2 records/s, 6 left -> 3 s
  counter.update(4)
  assert counter.rate == pytest.approx(2.0) and counter.eta == pytest.approx(3.0)
  assert len(lines) == 1  # under every_s since the first line
  clock.now += 4  # 6 s: 5 records -> 5/6 per s, 5 left -> 6 s
  counter.update()
  assert counter.rate == pytest.approx(5 / 6) and counter.eta == pytest.approx(6.0)
  assert lines[1] == "importing: 5/10 records (50%) | 0.833 records/s | ETA 6.0 s"
  clock.now += 1
  counter.update()
  assert len(lines) == 2  # 1 s after the last line
  clock.now += 114  # 121 s in all, 10 records
  counter.update(4)
  assert counter.eta == 0.0
  assert counter.finish() == "importing: done in 0:02:01 (10/10 records; 0.0826 records/s)"
  assert lines[-1] == "importing: done in 0:02:01 (10/10 records; 0.0826 records/s)"
  assert len(lines) == 4


def test_progress_warmup_leaves_the_first_update_out_of_the_rate():
  clock, lines = FakeClock(), []
  counter = progress.Progress(
      "embedding", 8, unit="batches", every_s=10, warmup=True, clock=clock, log=lines.append
  )
  clock.now += 30  # compile + first batch
  counter.update()
  assert counter.rate is None and counter.eta is None and counter.first_seconds == 30
  assert lines[-1] == "embedding: 1/8 batches (12%) | the first took 30.0 s (compile included)"
  clock.now += 2  # batches 2 and 3 in 2 s: 1 batch/s, 5 left
  counter.update(2)
  assert counter.rate == pytest.approx(1.0) and counter.eta == pytest.approx(5.0)
  clock.now += 5
  counter.update(5)
  assert counter.finish("embedded") == (
      "embedded in 37.0 s (8/8 batches; 1 batches/s; the first took 30.0 s (compile included))"
  )
  # Unknown total: counts and rate, no ETA.
  counter = progress.Progress("reading", clock=clock, log=lines.append, every_s=0)
  clock.now += 4
  counter.update(2)
  assert counter.eta is None and lines[-1] == "reading: 2 items | 0.5 items/s"


def test_progress_stays_quiet_for_short_work_and_on_failure():
  clock, lines = FakeClock(), []
  counter = progress.Progress(
      "search", 2, announce=False, min_seconds=10, every_s=20, clock=clock, log=lines.append
  )
  clock.now += 3
  counter.update(2)
  counter.finish()
  assert lines == []  # 3 s < min_seconds, no status line
  counter = progress.Progress(
      "search", 2, announce=False, min_seconds=10, every_s=20, clock=clock, log=lines.append
  )
  clock.now += 12
  counter.update(2)
  counter.finish()
  assert len(lines) == 1 and lines[-1].startswith("search: done in 12.0 s")
  with pytest.raises(RuntimeError):
    with progress.Progress("failing", clock=clock, log=lines.append):
      raise RuntimeError("boom")
  assert lines[-1] == "failing ..."  # no "done" line after a failure
  assert progress.format_duration(59.94) == "59.9 s"
  assert progress.format_duration(3725) == "1:02:05"


def test_exact_search_and_embedding_pass_log_progress(monkeypatch):
  lines = []
  monkeypatch.setattr(progress, "_log_info", lines.append)
  monkeypatch.setattr(search, "ANNOUNCE_MIN_PAIRS", 0)
  monkeypatch.setattr(search, "PROGRESS_MIN_SECONDS", 0.0)
  rng = np.random.default_rng(0)
  search.exact_search(rng.normal(size=(5, 4)), rng.normal(size=(7, 4)), 3, query_block=2)
  assert lines[0] == "exact search: 5 queries x 7 candidates (3 query blocks) ..."
  assert lines[-1].startswith("exact search: 5 queries x 7 candidates: done in ")
  assert "(3/3 query blocks;" in lines[-1]

  lines.clear()
  items = [{"x": float(i)} for i in range(10)]

  def batches_fn(items, *, input_cfg, batch_size, process_index, process_count):
    del input_cfg, process_index, process_count
    for start in range(0, len(items), batch_size):
      index = np.full(batch_size, -1, np.int32)
      chunk = np.arange(start, min(start + batch_size, len(items)))
      index[: len(chunk)] = chunk
      x = np.zeros((batch_size, 2), np.float32)
      x[: len(chunk), 0] = chunk
      yield {"x": x, "valid": index >= 0, "index": index}

  def predict_fn(params, batch):
    del params
    return {"z_text": batch["x"] * 2.0}

  out = embed.item_outputs(
      predict_fn, items, ("z_text",), input_cfg=None, batch_size=4, batches_fn=batches_fn
  )
  np.testing.assert_array_equal(out["z_text"][:, 0], 2.0 * np.arange(10))
  assert lines[0] == "embedding 10 items (z_text) (3 batches) ..."  # ceil(10 / 4) batches
  assert lines[-1].startswith("embedding 10 items (z_text): done in ")
  assert "(3/3 batches;" in lines[-1] and "compile included" in lines[-1]


def test_import_logs_records_of_each_split(tmp_path, monkeypatch):
  lines = []
  monkeypatch.setattr(progress, "_log_info", lines.append)
  image = io.BytesIO()
  Image.new("RGB", (4, 4), "red").save(image, format="PNG")

  def source():
    for i in range(3):
      yield f"r{i}", "captions.json", lambda i=i: {
          "id": f"r{i}",
          "image": image.getvalue(),
          "caption": f"caption {i}",
      }
    yield "r0", "captions.json", lambda: {"id": "r0", "image": b"", "caption": "again"}

  plan = writer.ImportPlan("test", {"train": schema.pairs_features()}, {"train": source})
  writer.write_dataset(plan, str(tmp_path / "out"), records.ProblemLog())
  assert "importing split 'train' (4 records) ..." in lines
  assert lines[-1].startswith("imported split 'train': 3 written, 1 skipped, in ")
  assert "(4/4 records;" in lines[-1]


# --- evaluate's printed headline ---------------------------------------------------------------

RESULTS = {
    "eval/flickr/i2t/recall@1": 40.0,
    "eval/flickr/rsum": 412.3456,
    "eval/universal/local/average": 51.0,
    "eval/universal/global/average": 44.5,
    "eval/universal/local/cirr_task7/recall@5": 30.0,
    "eval/masks/patch_mask/iou": 12.0,
}


def test_evaluate_main_prints_headline_figures_per_evaluation(tmp_path, monkeypatch, capsys):
  calls = {}

  def fake_evaluate(config, *, workdir, checkpoint, out, evals_cfg):
    calls.update(out=out, evals=list(evals_cfg))
    return dict(RESULTS)

  monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
  monkeypatch.setattr(
      evaluate,
      "_evals_config",
      lambda config: {"flickr": {}, "universal": {}, "masks": {}},
  )
  with flagsaver.flagsaver(out=str(tmp_path)):
    evaluate.main(["evaluate"])
  printed = capsys.readouterr().out.splitlines()
  assert calls == {"out": str(tmp_path), "evals": ["flickr", "universal", "masks"]}
  report_dir = os.path.join(str(tmp_path), "eval")
  assert printed == [
      "flickr: rsum 412.35",
      "universal: global/average 44.50 | local/average 51.00",
      f"masks: no headline metric; every metric is in {os.path.join(report_dir, 'masks')}.md",
      f"6 metrics; reports in {report_dir}",
  ]


# --- Markdown order ----------------------------------------------------------------------------


def test_markdown_table_orders_numbers_by_value():
  metrics = {
      "recall@10": 3.0,
      "recall@50": 4.0,
      "recall@1": 1.0,
      "recall@5": 2.0,
      "mR": 5.0,
      "task10/hit@1": 6.0,
      "task2/hit@1": 7.0,
      "task2/hit@10": 8.0,
  }
  record = {"name": "x", "type": "t", "history": [{"step": 1, "metrics": metrics}]}
  rows = [line.split(" | ")[0][2:] for line in report.markdown_table(record).splitlines()[4:]]
  assert rows == [
      "mR",
      "recall@1",
      "recall@5",
      "recall@10",
      "recall@50",
      "task2/hit@1",
      "task2/hit@10",
      "task10/hit@1",
  ]


# --- recall plots ------------------------------------------------------------------------------


def _universal_curves(tasks=9):
  return {
      f"{kind}/task{t}": [
          (k, 10.0 * t / tasks + k + (5 if kind == "local" else 0)) for k in (1, 5, 10)
      ]
      for kind in ("global", "local")
      for t in range(tasks)
  }


def test_recall_plot_facets_keep_at_most_eight_lines_each(tmp_path):
  curves = _universal_curves()  # 18 series: 9 tasks x 2 pools
  facets = report.recall_facets(curves)
  assert [(title, list(lines)) for title, lines in facets] == [
      ("global (1/2)", [f"task{t}" for t in range(5)]),
      ("global (2/2)", [f"task{t}" for t in range(5, 9)]),
      ("local (1/2)", [f"task{t}" for t in range(5)]),
      ("local (2/2)", [f"task{t}" for t in range(5, 9)]),
  ]
  path = str(tmp_path / "universal.png")
  drawn = report.draw_recall_curves(path, curves, title="universal", panel_size=(500, 300))
  assert drawn == [(title, list(lines)) for title, lines in facets]
  pixels = np.asarray(_png(path))
  assert pixels.shape == (report.TITLE_HEIGHT + 2 * 300, 2 * 500, 3)  # 2 x 2 panels
  for i, (_, lines) in enumerate(facets):
    x0, y0 = (i % 2) * 500, report.TITLE_HEIGHT + (i // 2) * 300
    panel = pixels[y0 : y0 + 300, x0 : x0 + 500]
    for j in range(8):
      assert (_count(panel, report.PALETTE[j]) > 30) == (j < len(lines)), (i, j)
  # 40 series with no prefix: 5 panels of 8; a single panel is one column wide.
  many = {f"t{i}": [(1, i), (10, 2 * i)] for i in range(40)}
  assert [len(lines) for _, lines in report.recall_facets(many)] == [8] * 5
  assert report.recall_facets({"i2t": [(1, 1.0)]}) == [("", {"i2t": [(1, 1.0)]})]
  report.draw_recall_curves(path, {"i2t": [(1, 1.0), (5, 2.0)]}, title="x", panel_size=(400, 200))
  assert _png(path).size == (400, report.TITLE_HEIGHT + 200)


def test_axis_ticks_are_round_and_labelled_in_one_notation():
  assert report.nice_ticks(0.0, 1e-3) == pytest.approx([0, 2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
  assert report.nice_ticks(2.74, 3.06) == pytest.approx([2.7, 2.8, 2.9, 3.0, 3.1])
  assert report.nice_ticks(5.0, 5.0)[0] <= 5.0 <= report.nice_ticks(5.0, 5.0)[-1]
  assert report.tick_labels([0, 2.5e-4, 5e-4, 1.25e-3]) == ["0", "2.50e-04", "5.00e-04", "1.25e-03"]
  assert report.tick_labels([0, 2e5, 4e5]) == ["0", "2.0e+05", "4.0e+05"]
  assert report.tick_labels([2.7, 2.8, 3.0]) == ["2.7", "2.8", "3"]


# --- training curves ---------------------------------------------------------------------------


def _made_up_run(workdir, steps=40):
  writer_ = metrics_writer.MetricWriter(workdir)
  expected = {"loss": [], "lr": [], "eval": []}
  for step in range(1, steps + 1):
    loss, lr = 3.0 * math.exp(-step / 10) + 0.2, 0.01 * min(1.0, step / 5)
    writer_.write(step, {"loss": loss, "lr": lr, "grad_norm": 1.0})
    expected["loss"].append((step, loss))
    expected["lr"].append((step, lr))
    if step % 20 == 0:
      writer_.write(step, {"eval/flickr/rsum": 100.0 + step, "eval/flickr/i2t/recall@1": 5.0})
      expected["eval"].append((step, 100.0 + step))
  writer_.close()
  return expected


def test_curves_png_from_a_made_up_metrics_jsonl(tmp_path):
  workdir = str(tmp_path / "run")
  expected = _made_up_run(workdir)
  path = report.write_training_curves(workdir, ("rsum",))
  assert path == os.path.join(workdir, "curves.png")
  records = metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  curves = report.training_curves(records, ("rsum",))
  # metrics.jsonl holds the float64 values written (JSON keeps every digit).
  assert curves["loss"]["loss"] == expected["loss"]
  assert curves["lr"]["learning rate"] == expected["lr"]
  assert curves["evals"] == {"flickr/rsum": expected["eval"]}
  image = _png(path)
  assert image.size == (960, report.TITLE_HEIGHT + 2 * 320)  # loss/lr panel + rsum panel
  pixels = np.asarray(image)
  loss_panel = pixels[report.TITLE_HEIGHT : report.TITLE_HEIGHT + 320]
  eval_panel = pixels[report.TITLE_HEIGHT + 320 :]
  assert _count(loss_panel, report.PALETTE[0]) > 200  # the loss line
  assert _count(loss_panel, report.PALETTE[1]) > 200  # the learning-rate line and axis
  assert _count(eval_panel, report.PALETTE[0]) > 30  # rsum
  # Without evaluation lines: one panel; without any train line: no picture.
  assert report.draw_training_curves(
      path, {"loss": curves["loss"], "lr": {}, "evals": {}}, title="t"
  ) == ["loss and learning rate"]
  assert _png(path).size == (960, report.TITLE_HEIGHT + 320)
  os.makedirs(tmp_path / "evals_only")
  with open(tmp_path / "evals_only" / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 5, "eval/flickr/rsum": 3.0}) + "\n")
  assert report.write_training_curves(str(tmp_path / "evals_only"), ("rsum",)) is None
  assert not (tmp_path / "evals_only" / "curves.png").exists()


def test_read_metrics_names_the_bad_line_and_skips_a_cut_short_last_one(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  assert metrics_writer.read_metrics(str(path)) == [{"step": 1, "loss": 2.0}]
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not valid JSON"):
    metrics_writer.read_metrics(str(path))
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not valid JSON"):
    report.write_training_curves(str(tmp_path), ("rsum",))
  assert report.write_training_curves(str(tmp_path), ("rsum",), errors="log") is None
  path.write_text('{"step": "7", "loss": 1.0}\n')
  with pytest.raises(ValueError, match=r"line 1: field 'step' must be an integer, got '7'"):
    metrics_writer.read_metrics(str(path))
  assert metrics_writer.read_metrics(str(tmp_path / "absent.jsonl")) == []


# --- SOLAR overlay legend ----------------------------------------------------------------------


def test_mask_overlays_carry_a_legend_of_their_colours():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(2, 16, 16, 3), dtype=np.uint8)
  truth = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], bool)
  predicted = np.array([[1, 1, 0, 0], [0, 0, 1, 0]], bool)
  figure, labels = solar_evaluator.overlay_figure(images, truth, predicted, (2, 2))
  assert labels == [text for text, _ in solar_evaluator.OVERLAY_LEGEND]
  joined = " / ".join(labels)
  for words in (
      "image | ground truth | prediction",
      "green: true intersection",
      "red: predicted intersection",
      "untinted",
  ):
    assert words in joined
  picture = solar_evaluator.overlay_rows(images, truth, predicted, (2, 2))
  rows = len(solar_evaluator.OVERLAY_LEGEND)
  assert figure.size == (
      picture.shape[1],
      picture.shape[0] + rows * solar_evaluator.LEGEND_ROW_HEIGHT + 8,
  )
  pixels = np.asarray(figure)
  np.testing.assert_array_equal(pixels[: picture.shape[0]], picture)
  legend = pixels[picture.shape[0] :]
  assert _count(legend, solar_evaluator.TRUE_COLOUR) >= 100  # the green swatch (12 x 12)
  assert _count(legend, solar_evaluator.PREDICTED_COLOUR) >= 100  # the red one
  assert (legend.sum(-1) < 200).sum() > 200  # dark text
