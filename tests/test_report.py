"""Evaluation reports: curve extraction, JSON history, Markdown table, PNG plot."""

import json

import numpy as np
import pytest
from PIL import Image

from mmret.evals import report

METRICS = {
    "i2t/recall@1": 40.0,
    "i2t/recall@5": 70.0,
    "i2t/recall@10": 80.0,
    "t2i/recall@1": 30.0,
    "t2i/recall@10": 75.0,
    "rsum": 295.0,
    "i2t/scann_recall@10": 98.0,
    "recall@5": 50.0,
}


def test_recall_curves_groups_series_and_skips_scann():
  curves = report.recall_curves(METRICS)
  assert curves == {
      "all": [(5, 50.0)],
      "i2t": [(1, 40.0), (5, 70.0), (10, 80.0)],
      "t2i": [(1, 30.0), (10, 75.0)],
  }
  assert report.recall_curves({"rsum": 1.0, "local/a/recall@5": float("nan")}) == {}


def test_history_replaces_a_rerun_step_and_table_lists_steps(tmp_path):
  path = str(tmp_path / "x.json")
  report.update_history(path, "x", "caption5", 10, {"rsum": 1.0})
  report.update_history(path, "x", "caption5", 20, {"rsum": 2.0, "i2t/recall@1": 3.0})
  record = report.update_history(path, "x", "caption5", 10, {"rsum": 5.0})
  with open(path) as f:
    assert json.load(f) == record
  assert [(e["step"], e["metrics"]["rsum"]) for e in record["history"]] == [(10, 5.0), (20, 2.0)]
  table = report.markdown_table(record).splitlines()
  assert table[0] == "# x (caption5)"
  assert table[2] == "| metric | step 10 | step 20 |"
  assert "| i2t/recall@1 |  | 3.00 |" in table
  assert "| rsum | 5.00 | 2.00 |" in table
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="x.json is not valid JSON"):
    report.update_history(path, "x", "caption5", 30, {})


def _colour_pixels(image, hex_colour):
  rgb = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
  return int(np.all(np.asarray(image) == rgb, axis=-1).sum())


def test_png_has_axes_and_one_coloured_line_per_series(tmp_path):
  path = str(tmp_path / "curves.png")
  curves = report.recall_curves(METRICS)
  report.draw_recall_curves(path, curves, title="test", panel_size=(800, 450))
  image = Image.open(path).convert("RGB")
  assert image.size == (800, report.TITLE_HEIGHT + 450)  # one panel
  pixels = np.asarray(image)
  assert (pixels == 0).all(axis=-1).sum() > 1000  # axes, ticks and text in black
  for i in range(len(curves)):
    assert _colour_pixels(image, report.PALETTE[i]) > 50, f"series {i} not drawn"
  assert _colour_pixels(image, report.PALETTE[len(curves)]) == 0


def test_png_splits_many_series_into_panels_and_rejects_empty(tmp_path):
  curves = {f"task{i:02d}": [(1, i), (5, 2 * i), (50, 3 * i)] for i in range(40)}
  panels = report.draw_recall_curves(
      str(tmp_path / "many.png"), curves, title="many", panel_size=(640, 300)
  )
  assert [len(lines) for _, lines in panels] == [8] * 5
  assert [label for _, lines in panels for label in lines] == sorted(curves)
  # Two columns, three rows.
  assert Image.open(tmp_path / "many.png").size == (2 * 640, report.TITLE_HEIGHT + 3 * 300)
  with pytest.raises(ValueError, match="no recall curves"):
    report.draw_recall_curves(str(tmp_path / "none.png"), {}, title="none")


def test_write_reports_writes_all_three_files(tmp_path):
  paths = report.write_reports(str(tmp_path), "flickr", "caption5", 7, METRICS)
  assert set(paths) == {"json", "md", "png"}
  with open(paths["md"]) as f:
    assert "| rsum | 295.00 |" in f.read()
  assert Image.open(paths["png"]).format == "PNG"
  # Metrics without recall curves (e.g. MMEB's hit@1) get no plot.
  assert set(report.write_reports(str(tmp_path), "mmeb", "mmeb", 7, {"A/hit@1": 1.0})) == {
      "json",
      "md",
  }
