"""Reports in the workdir: evaluation history (JSON), Markdown tables and plots (PNG, drawn with PIL).

For an evaluation ``name`` it writes, under ``<workdir>/eval/``:
  ``<name>.json``  ``{"name", "type", "history": [{"step", "metrics"}, ...]}`` (one entry per step)
  ``<name>.md``    a table of every metric (natural order: ``recall@5`` before ``recall@10``) over
                   the latest ``MARKDOWN_STEPS`` steps
  ``<name>.png``   recall@K curves of the latest step: small multiples, at most
                   ``MAX_SERIES_PER_PANEL`` lines per panel (see ``draw_recall_curves``)
A curve series is every metric prefix ending in ``recall@<k>`` (``i2t/recall@5`` -> series
``i2t``; a bare ``recall@5`` -> series ``all``); ScaNN's ``scann_recall@k`` is not a curve.

For a training run (or stage) directory, ``write_training_curves`` draws ``curves.png`` from its
``metrics.jsonl``: loss and learning rate against the step, and the evaluations' headline metrics.

The workdir may be a local path or a URL (``gs://bucket/run``): every file goes through
``etils.epath`` (PNGs are encoded into a file object opened with ``'wb'``).
"""

import json
import math
import os
import re
from typing import Mapping, Optional, Sequence

from absl import logging
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from mmret import faults, metrics_writer

MARKDOWN_STEPS = 5
_CURVE_KEY = re.compile(r"^(?:(?P<series>.*)/)?recall@(?P<k>\d+)$")
# Line colours (Tableau 10); a panel holds at most MAX_SERIES_PER_PANEL lines, each its own.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
# Marker shapes, cycled with the colours: neighbouring lines of a panel differ in both.
MARKERS = ("circle", "square", "triangle", "diamond")
MAX_SERIES_PER_PANEL = 8  # lines per plot panel; more series get more panels
TITLE_HEIGHT = 32  # pixels above the panels of a figure
CURVES_FILE = "curves.png"  # a run's loss / learning-rate / headline-metric curves


def recall_curves(metrics: Mapping[str, float]) -> dict[str, list[tuple[int, float]]]:
  """Groups ``<series>/recall@<k>`` metrics into ``{series: [(k, value), ...]}`` sorted by k."""
  curves: dict[str, list[tuple[int, float]]] = {}
  for key, value in metrics.items():
    match = _CURVE_KEY.match(key)
    if match is None or value is None or not math.isfinite(float(value)):
      continue
    curves.setdefault(match["series"] or "all", []).append((int(match["k"]), float(value)))
  return {series: sorted(points) for series, points in sorted(curves.items())}


def update_history(
    path: str, name: str, eval_type: str, step: int, metrics: Mapping[str, float]
) -> dict:
  """Adds (or replaces) the entry of ``step`` in the JSON history at ``path``; returns it all."""
  record = {"name": name, "type": eval_type, "history": []}
  if epath.Path(path).exists():
    with epath.Path(path).open("r") as f:
      try:
        record = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"evaluation history {path} is not valid JSON: {e}") from e
  history = [entry for entry in record.get("history", []) if entry["step"] != step]
  history.append({"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}})
  record.update(name=name, type=eval_type, history=sorted(history, key=lambda e: e["step"]))
  tmp = epath.Path(f"{path}.tmp")
  with tmp.open("w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  tmp.replace(path)  # Readers never see a half-written file.
  return record


def _format(value: Optional[float]) -> str:
  if value is None:
    return ""
  return "nan" if not math.isfinite(value) else f"{value:.2f}"


def markdown_table(record: dict, max_steps: int = MARKDOWN_STEPS) -> str:
  """Markdown: one row per metric, one column per step (the latest ``max_steps``)."""
  history = record["history"][-max_steps:]
  names = sorted({key for entry in history for key in entry["metrics"]}, key=natural_key)
  lines = [
      f"# {record['name']} ({record['type']})",
      "",
      "| metric | " + " | ".join(f"step {entry['step']}" for entry in history) + " |",
      "|---|" + "---:|" * len(history),
  ]
  for metric in names:
    cells = [_format(entry["metrics"].get(metric)) for entry in history]
    lines.append(f"| {metric} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def natural_key(name: str) -> tuple:
  """Sort key ordering the numbers inside names by value: ``recall@5`` before ``recall@10``."""
  parts = re.split(r"(\d+)", name)
  return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _font(size: int):
  return ImageFont.load_default(size=size)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 x 10^n) covering [lo, hi]."""
  if not (math.isfinite(lo) and math.isfinite(hi)):
    raise ValueError(f"axis range [{lo}, {hi}] is not finite")
  if hi <= lo:
    lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
  raw = (hi - lo) / max(count, 1)
  magnitude = 10.0 ** math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
  first = math.floor(lo / step + 1e-9) * step
  ticks, i = [], 0
  while True:
    value = first + i * step
    ticks.append(round(value, 12))
    if value >= hi - 1e-9 * step:
      return ticks
    i += 1


def tick_labels(ticks: Sequence[float]) -> list[str]:
  """One notation for a whole axis: scientific (with the fewest digits that write every tick
  exactly; zero stays ``0``) when its largest tick is under 0.01 or from 1e5 on, else plain."""
  largest = max((abs(t) for t in ticks), default=0.0)
  if not (largest and (largest < 1e-2 or largest >= 1e5)):
    return [f"{round(t, 10):.6g}" for t in ticks]
  for digits in range(1, 6):
    labels = [f"{t:.{digits}e}" for t in ticks]
    if all(abs(float(label) - t) <= 1e-9 * largest for label, t in zip(labels, ticks)):
      break
  return ["0" if t == 0 else label for label, t in zip(labels, ticks)]


def _draw_marker(draw, x, y, shape, colour, radius=4):
  box = (x - radius, y - radius, x + radius, y + radius)
  if shape == "circle":
    draw.ellipse(box, fill=colour)
  elif shape == "square":
    draw.rectangle(box, fill=colour)
  elif shape == "diamond":
    draw.polygon([(x, y - radius), (x + radius, y), (x, y + radius), (x - radius, y)], fill=colour)
  else:
    draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)


def _fit_text(draw, text: str, width: float, font) -> str:
  """``text``, cut with an ellipsis to fit ``width`` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
    text = text[:-1]
  return text + "…"


class _Panel:
  """A plot box of an image: maps data to pixels, draws axes, ticks, grid, series and a legend."""

  def __init__(self, draw, box, x_range, y_range, *, log_x=False, font_size=13):
    self.draw, self.box = draw, box
    self.font, self.font_size = _font(font_size), font_size
    self.log_x = log_x
    self.x_range, self.y_range = x_range, y_range

  def _x_axis(self, x):
    return math.log10(x) if self.log_x else float(x)

  def px(self, x):
    left, _, right, _ = self.box
    lo, hi = map(self._x_axis, self.x_range)
    offset = 0.5 if hi == lo else (self._x_axis(x) - lo) / (hi - lo)
    return left + offset * (right - left)

  def py(self, y):
    _, top, _, bottom = self.box
    lo, hi = self.y_range
    y = max(lo, min(hi, y))
    return bottom - (y - lo) / ((hi - lo) or 1.0) * (bottom - top)

  def text(self, xy, text, colour="black", *, anchor="la"):
    self.draw.text(xy, text, fill=colour, font=self.font, anchor=anchor)

  def frame(self, title=""):
    left, top, right, bottom = self.box
    self.draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    if title:
      self.text(
          ((left + right) / 2, top - 8),
          _fit_text(self.draw, title, right - left, self.font),
          anchor="md",
      )

  def x_ticks(self, ticks, label, *, labels=None):
    left, _, right, bottom = self.box
    labels = labels or tick_labels(ticks)
    for tick, text in zip(ticks, labels):
      x = self.px(tick)
      self.draw.line([(x, bottom), (x, bottom + 5)], fill="black")
      self.text((x, bottom + 8), text, anchor="ma")
    self.text(((left + right) / 2, bottom + 12 + self.font_size), label, anchor="ma")

  def y_ticks(self, ticks, label, *, side="left", colour="black", grid=True):
    left, top, right, bottom = self.box
    edge = left if side == "left" else right
    direction = -1 if side == "left" else 1
    if side == "right":
      self.draw.line([(right, top), (right, bottom)], fill=colour, width=2)
    for tick, text in zip(ticks, tick_labels(ticks)):
      y = self.py(tick)
      if grid:
        self.draw.line([(left + 1, y), (right - 1, y)], fill="#e6e6e6")
      self.draw.line([(edge, y), (edge + direction * 5, y)], fill=colour)
      self.text(
          (edge + direction * 8, y),
          text,
          colour,
          anchor="rm" if side == "left" else "lm",
      )
    self.text(
        (edge, top - 8 - self.font_size - 4), label, colour, anchor="ls" if side == "left" else "rs"
    )

  def series(self, points, colour, marker=None):
    xy = [(self.px(x), self.py(y)) for x, y in points if math.isfinite(y)]
    if len(xy) > 1:
      self.draw.line(xy, fill=colour, width=2)
    if marker:
      for x, y in xy:
        _draw_marker(self.draw, x, y, marker, colour)

  def legend(self, entries, x, y, width):
    """``entries``: (label, colour, marker or None); one row each from (x, y)."""
    row = self.font_size + 7
    for i, (label, colour, marker) in enumerate(entries):
      middle = y + i * row + self.font_size / 2 + 1
      self.draw.line([(x, middle), (x + 22, middle)], fill=colour, width=2)
      if marker:
        _draw_marker(self.draw, x + 11, middle, marker, colour)
      self.text((x + 30, y + i * row), _fit_text(self.draw, label, width - 30, self.font))


def recall_facets(
    curves: Mapping[str, Sequence[tuple[int, float]]], max_series: int = MAX_SERIES_PER_PANEL
) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
  """Splits recall curves into panels of at most ``max_series`` lines: [(title, {label: points})].

  Series are grouped by their prefix before the last ``/`` (``local/cirr_task7`` -> panel
  ``local``, line ``cirr_task7``); a group larger than ``max_series`` is cut into balanced
  panels ``<group> (1/n)`` ... Groups and lines are in natural order (``task2`` before ``task10``).
  """
  groups: dict[str, dict[str, list]] = {}
  for series in sorted(curves, key=natural_key):
    group, _, label = series.rpartition("/")
    groups.setdefault(group, {})[label] = list(curves[series])
  facets = []
  for group in sorted(groups, key=natural_key):
    labels = list(groups[group])
    count = -(-len(labels) // max_series)
    size = -(-len(labels) // count)
    for i in range(count):
      chunk = labels[i * size : (i + 1) * size]
      title = group if count == 1 else f"{group} ({i + 1}/{count})".strip()
      facets.append((title, {label: groups[group][label] for label in chunk}))
  return facets


def draw_recall_curves(
    path: str,
    curves: Mapping[str, Sequence[tuple[int, float]]],
    *,
    title: str,
    panel_size: tuple[int, int] = (640, 340),
    font_size: int = 13,
    max_series: int = MAX_SERIES_PER_PANEL,
) -> list[tuple[str, list[str]]]:
  """Draws recall (percent, 0-100) against K into a PNG at ``path``: small multiples.

  Curves are split by :func:`recall_facets` into panels of at most ``max_series`` lines, laid out
  in two columns (one when there is a single panel) under the title; the image is
  ``columns x panel width`` by ``TITLE_HEIGHT + rows x panel height``. Every panel shares the
  K axis (log scale when K spans a factor of 10 or more) and the 0-100 recall axis. Within a
  panel each line has its own colour, and its marker differs from its neighbours'; the legend
  right of the plot names them. The n-th line of every panel looks the same, so a task keeps its
  look across pools.
  Returns [(panel title, [line labels])].
  """
  if not curves:
    raise ValueError("no recall curves to draw")
  facets = recall_facets(curves, max_series)
  width, height = panel_size
  columns = 1 if len(facets) == 1 else 2
  rows = -(-len(facets) // columns)
  image = Image.new("RGB", (columns * width, TITLE_HEIGHT + rows * height), "white")
  draw = ImageDraw.Draw(image)
  font = _font(font_size)
  draw.text((image.width / 2, TITLE_HEIGHT / 2), title, fill="black", font=font, anchor="mm")
  ks = sorted({k for points in curves.values() for k, _ in points})
  log_x = ks[-1] / ks[0] >= 10
  legend_width = min(220, width // 3)
  for i, (facet_title, lines) in enumerate(facets):
    x0, y0 = (i % columns) * width, TITLE_HEIGHT + (i // columns) * height
    box = (x0 + 60, y0 + 40, x0 + width - legend_width - 24, y0 + height - 48)
    panel = _Panel(draw, box, (ks[0], ks[-1]), (0.0, 100.0), log_x=log_x, font_size=font_size)
    panel.y_ticks(range(0, 101, 20), "Recall@K (%)")
    panel.x_ticks(ks, "K (log scale)" if log_x else "K", labels=[str(k) for k in ks])
    panel.frame(facet_title)
    entries = []
    for j, (label, points) in enumerate(lines.items()):
      colour, marker = PALETTE[j % len(PALETTE)], MARKERS[j % len(MARKERS)]
      panel.series(points, colour, marker)
      entries.append((label, colour, marker))
    panel.legend(entries, box[2] + 20, box[1], legend_width)
  _save_png(image, path)
  return [(facet_title, list(lines)) for facet_title, lines in facets]


def _save_png(image: Image.Image, path: str):
  with epath.Path(path).open("wb") as f:
    image.save(f, format="PNG")


def write_reports(
    workdir: str, name: str, eval_type: str, step: int, metrics: Mapping[str, float]
) -> dict[str, str]:
  """Writes ``eval/<name>.json``, ``.md`` and, given recall curves, ``.png``; returns the paths."""
  directory = os.path.join(os.fspath(workdir), "eval")
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  paths = {
      "json": os.path.join(directory, f"{name}.json"),
      "md": os.path.join(directory, f"{name}.md"),
  }
  record = update_history(paths["json"], name, eval_type, step, metrics)
  epath.Path(paths["md"]).write_text(markdown_table(record))
  curves = recall_curves(metrics)
  if curves:
    paths["png"] = os.path.join(directory, f"{name}.png")
    draw_recall_curves(paths["png"], curves, title=f"{name} ({eval_type}), step {step}")
  return paths


def training_curves(
    records: Sequence[Mapping], headline_metrics: Sequence[str]
) -> dict[str, dict[str, list[tuple[int, float]]]]:
  """The curves of a run's ``metrics.jsonl`` records, by step (the last record of a step wins).

  Returns ``{"loss": {"loss": [(step, value)]}, "lr": {"learning rate": ...},
  "evals": {"<eval>/<metric>": ...}}``: train lines hold ``loss`` and ``lr``; of the evaluation
  lines (``eval/<name>/<metric>``), the metrics whose last component is in ``headline_metrics``.
  Non-finite values are left out.
  """
  by_step: dict[str, dict[str, dict[int, float]]] = {"loss": {}, "lr": {}, "evals": {}}
  for record in records:
    step = int(record["step"])
    for key, value in record.items():
      if key == "loss":
        group, name = "loss", "loss"
      elif key == "lr":
        group, name = "lr", "learning rate"
      elif key.startswith("eval/") and key.rsplit("/", 1)[-1] in headline_metrics:
        group, name = "evals", key[len("eval/") :]
      else:
        continue
      if isinstance(value, (int, float)) and math.isfinite(value):
        by_step[group].setdefault(name, {})[step] = float(value)
  return {
      group: {name: sorted(points.items()) for name, points in sorted(series.items())}
      for group, series in by_step.items()
  }


def _padded_range(values: Sequence[float], *, from_zero: bool = False) -> tuple[float, float]:
  """[min, max] of ``values`` widened by 5% (from 0 with ``from_zero``); never below 0 when no
  value is."""
  lo, hi = min(values), max(values)
  if from_zero:
    lo = min(lo, 0.0)
  pad = 0.05 * (hi - lo) if hi > lo else 0.5 * (abs(hi) or 1.0)
  low = lo - pad
  if lo >= 0:
    low = max(low, 0.0)
  return low, hi + pad


def draw_training_curves(
    path: str,
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    *,
    title: str,
    panel_size: tuple[int, int] = (960, 320),
    font_size: int = 13,
    max_series: int = MAX_SERIES_PER_PANEL,
) -> list[str]:
  """Draws a run's curves (from :func:`training_curves`) into a PNG at ``path``.

  Panels, stacked under the title, all against the training step: the loss (left axis) with the
  learning rate (right axis); then, when the run has evaluation lines, one panel per kind of
  headline metric (``rsum``, ``average``, ...: figures of one scale share an axis), at most
  ``max_series`` lines each. The image is ``panel width`` by
  ``TITLE_HEIGHT + panels x panel height``. Returns the panel titles.
  """
  loss = curves.get("loss", {}).get("loss", [])
  lr = curves.get("lr", {}).get("learning rate", [])
  evals = dict(curves.get("evals", {}))
  if not (loss or lr):
    raise ValueError("no loss or learning-rate values to draw")
  kinds: dict[str, list[str]] = {}
  for name in sorted(evals, key=natural_key):
    kinds.setdefault(name.rsplit("/", 1)[-1], []).append(name)
  panels, chunks = ["loss and learning rate"], []
  for kind in sorted(kinds, key=natural_key):
    names = kinds[kind]
    count = -(-len(names) // max_series)
    for i in range(count):
      chunks.append(names[i * max_series : (i + 1) * max_series])
      panels.append(f"evaluation: {kind}" + (f" ({i + 1}/{count})" if count > 1 else ""))
  width, height = panel_size
  image = Image.new("RGB", (width, TITLE_HEIGHT + len(panels) * height), "white")
  draw = ImageDraw.Draw(image)
  draw.text((width / 2, TITLE_HEIGHT / 2), title, fill="black", font=_font(font_size), anchor="mm")
  steps = [s for points in (loss, lr, *evals.values()) for s, _ in points]
  step_ticks = nice_ticks(min(steps), max(steps), 6)
  x_range = (step_ticks[0], step_ticks[-1])
  legend_width = min(260, width // 4)

  def box(row):  # the same step axis in every panel, room for the learning rate's on the right
    top = TITLE_HEIGHT + row * height
    return (72, top + 40, width - legend_width - 84, top + height - 48)

  loss_box = box(0)
  entries = []
  if loss:
    y_ticks = nice_ticks(*_padded_range([v for _, v in loss]))
    panel = _Panel(draw, loss_box, x_range, (y_ticks[0], y_ticks[-1]), font_size=font_size)
    panel.y_ticks(y_ticks, "loss", colour=PALETTE[0])
    marker = "circle" if len(loss) <= 50 else None
    panel.series(loss, PALETTE[0], marker)
    entries.append(("loss (left axis)", PALETTE[0], marker))
  if lr:
    y_ticks = nice_ticks(*_padded_range([v for _, v in lr], from_zero=True))
    panel = _Panel(draw, loss_box, x_range, (y_ticks[0], y_ticks[-1]), font_size=font_size)
    panel.y_ticks(y_ticks, "learning rate", side="right", colour=PALETTE[1], grid=not loss)
    marker = "square" if len(lr) <= 50 else None
    panel.series(lr, PALETTE[1], marker)
    entries.append(("learning rate (right axis)", PALETTE[1], marker))
  panel.x_ticks(step_ticks, "step")
  panel.frame(panels[0])
  panel.legend(entries, width - legend_width - 4, loss_box[1], legend_width)
  for row, chunk in enumerate(chunks, start=1):
    values = [v for name in chunk for _, v in evals[name]]
    y_ticks = nice_ticks(*_padded_range(values))
    eval_box = box(row)
    panel = _Panel(draw, eval_box, x_range, (y_ticks[0], y_ticks[-1]), font_size=font_size)
    panel.y_ticks(y_ticks, panels[row].split(": ", 1)[1])
    panel.x_ticks(step_ticks, "step")
    panel.frame(panels[row])
    entries = []
    for j, name in enumerate(chunk):
      colour, marker = PALETTE[j % len(PALETTE)], MARKERS[j % len(MARKERS)]
      panel.series(evals[name], colour, marker)
      entries.append((name, colour, marker))
    panel.legend(entries, width - legend_width - 4, eval_box[1], legend_width)
  _save_png(image, path)
  return panels


def write_training_curves(
    run_dir: str, headline_metrics: Optional[Sequence[str]] = None, *, errors: str = "raise"
) -> Optional[str]:
  """Draws ``<run_dir>/curves.png`` from ``<run_dir>/metrics.jsonl``; returns its path, or None
  when the run has no loss or learning-rate line yet.

  ``headline_metrics``: last components of the evaluation metrics drawn (default
  ``mmret.train.HEADLINE_METRICS``, the figures the training log prints). ``errors``: 'raise', or
  'log' to log a warning naming the file instead (a finished run is not failed by its plot).
  """
  if errors not in ("raise", "log"):
    raise ValueError(f"errors must be 'raise' or 'log', got {errors!r}")
  if headline_metrics is None:
    from mmret.train import HEADLINE_METRICS as headline_metrics  # the training log's selection

  jsonl = os.path.join(os.fspath(run_dir), metrics_writer.METRICS_FILE)
  path = os.path.join(os.fspath(run_dir), CURVES_FILE)
  try:
    curves = training_curves(metrics_writer.read_metrics(jsonl), headline_metrics)
    if not (curves["loss"] or curves["lr"]):
      return None
    title = f"{epath.Path(faults.absolute(run_dir)).name}: training curves"
    draw_training_curves(path, curves, title=title)
  except (OSError, ValueError) as e:
    if errors == "raise":
      raise
    logging.warning("Could not draw %s from %s: %s", path, jsonl, e)
    return None
  return path
