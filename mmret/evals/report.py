"""Evaluation reports in the workdir: JSON history, a Markdown table and a recall@K plot (PNG).

For an evaluation ``name`` it writes, under ``<workdir>/eval/``:
  ``<name>.json``  ``{"name", "type", "history": [{"step", "metrics"}, ...]}`` (one entry per step)
  ``<name>.md``    a table of every metric over the latest ``MARKDOWN_STEPS`` steps
  ``<name>.png``   recall@K curves of the latest step, one line per series, drawn with PIL
A curve series is every metric prefix ending in ``recall@<k>`` (``i2t/recall@5`` -> series
``i2t``; a bare ``recall@5`` -> series ``all``); ScaNN's ``scann_recall@k`` is not a curve.
"""

import json
import math
import os
import re
from typing import Mapping, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

MARKDOWN_STEPS = 5
_CURVE_KEY = re.compile(r"^(?:(?P<series>.*)/)?recall@(?P<k>\d+)$")
# Line colours (Tableau 10), cycled; later cycles change the marker shape.
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
MARKERS = ("circle", "square", "triangle")


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
  if os.path.exists(path):
    with open(path) as f:
      try:
        record = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"evaluation history {path} is not valid JSON: {e}") from e
  history = [entry for entry in record.get("history", []) if entry["step"] != step]
  history.append({"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}})
  record.update(name=name, type=eval_type, history=sorted(history, key=lambda e: e["step"]))
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # Readers never see a half-written file.
  return record


def _format(value: Optional[float]) -> str:
  if value is None:
    return ""
  return "nan" if not math.isfinite(value) else f"{value:.2f}"


def markdown_table(record: dict, max_steps: int = MARKDOWN_STEPS) -> str:
  """Markdown: one row per metric, one column per step (the latest ``max_steps``)."""
  history = record["history"][-max_steps:]
  names = sorted({key for entry in history for key in entry["metrics"]})
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


def _draw_marker(draw, x, y, shape, colour, radius=4):
  box = (x - radius, y - radius, x + radius, y + radius)
  if shape == "circle":
    draw.ellipse(box, fill=colour)
  elif shape == "square":
    draw.rectangle(box, fill=colour)
  else:
    draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)


def draw_recall_curves(
    path: str,
    curves: Mapping[str, Sequence[tuple[int, float]]],
    *,
    title: str,
    size: tuple[int, int] = (960, 540),
    font_size: int = 13,
) -> None:
  """Draws recall (percent, 0-100) against K for each series into a PNG at ``path``.

  K is on a log axis when it spans a factor of 10 or more. The legend sits right of the plot;
  series that do not fit are summarised as "+N more".
  """
  if not curves:
    raise ValueError("no recall curves to draw")
  width, height = size
  font = ImageFont.load_default(size=font_size)
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  legend_width = 260
  left, right, top, bottom = 64, width - legend_width - 20, 56, height - 56
  ks = sorted({k for points in curves.values() for k, _ in points})
  log_axis = ks[-1] / ks[0] >= 10
  to_axis = (lambda k: math.log10(k)) if log_axis else float
  lo, hi = to_axis(ks[0]), to_axis(ks[-1])
  span = (hi - lo) or 1.0

  def px(k):
    offset = 0.5 if hi == lo else (to_axis(k) - lo) / span
    return left + offset * (right - left)

  def py(value):
    return bottom - max(0.0, min(100.0, value)) / 100.0 * (bottom - top)

  draw.text(
      ((left + right) / 2 - draw.textlength(title, font=font) / 2, 10),
      title,
      fill="black",
      font=font,
  )
  for tick in range(0, 101, 20):  # y grid and ticks
    y = py(tick)
    draw.line([(left, y), (right, y)], fill="#e6e6e6")
    draw.line([(left - 5, y), (left, y)], fill="black")
    label = str(tick)
    draw.text(
        (left - 10 - draw.textlength(label, font=font), y - font_size / 2),
        label,
        fill="black",
        font=font,
    )
  for k in ks:  # x ticks at every K evaluated
    x = px(k)
    draw.line([(x, bottom), (x, bottom + 5)], fill="black")
    label = str(k)
    draw.text(
        (x - draw.textlength(label, font=font) / 2, bottom + 8), label, fill="black", font=font
    )
  draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
  x_label = "K (log scale)" if log_axis else "K"
  draw.text(
      ((left + right) / 2 - draw.textlength(x_label, font=font) / 2, bottom + 28),
      x_label,
      fill="black",
      font=font,
  )
  draw.text((8, top - 24), "Recall@K (%)", fill="black", font=font)

  row_height = font_size + 7
  max_rows = max(1, (bottom - top) // row_height)
  series_names = list(curves)
  shown = series_names if len(series_names) <= max_rows else series_names[: max_rows - 1]
  legend_x = right + 24
  for i, name in enumerate(series_names):
    colour = PALETTE[i % len(PALETTE)]
    shape = MARKERS[(i // len(PALETTE)) % len(MARKERS)]
    points = [(px(k), py(v)) for k, v in curves[name]]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    for x, y in points:
      _draw_marker(draw, x, y, shape, colour)
    if name in shown:
      y = top + i * row_height
      draw.line(
          [(legend_x, y + font_size / 2 + 1), (legend_x + 22, y + font_size / 2 + 1)],
          fill=colour,
          width=2,
      )
      _draw_marker(draw, legend_x + 11, y + font_size / 2 + 1, shape, colour)
      label = name
      while len(label) > 4 and draw.textlength(label, font=font) > legend_width - 40:
        label = label[:-2]
      if label != name:
        label = label[:-1] + "…"
      draw.text((legend_x + 30, y), label, fill="black", font=font)
  if len(shown) < len(series_names):
    y = top + len(shown) * row_height
    draw.text(
        (legend_x + 30, y), f"+{len(series_names) - len(shown)} more", fill="black", font=font
    )
  image.save(path, format="PNG")


def write_reports(
    workdir: str, name: str, eval_type: str, step: int, metrics: Mapping[str, float]
) -> dict[str, str]:
  """Writes ``eval/<name>.json``, ``.md`` and, given recall curves, ``.png``; returns the paths."""
  directory = os.path.join(workdir, "eval")
  os.makedirs(directory, exist_ok=True)
  paths = {
      "json": os.path.join(directory, f"{name}.json"),
      "md": os.path.join(directory, f"{name}.md"),
  }
  record = update_history(paths["json"], name, eval_type, step, metrics)
  with open(paths["md"], "w") as f:
    f.write(markdown_table(record))
  curves = recall_curves(metrics)
  if curves:
    paths["png"] = os.path.join(directory, f"{name}.png")
    draw_recall_curves(paths["png"], curves, title=f"{name} ({eval_type}), step {step}")
  return paths
