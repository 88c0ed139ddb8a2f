"""Image decoding, random-resized crop and flip (numpy + PIL, no framework); the pixels stay uint8
and are normalised on the device (``mmret.ops.normalize_pixels``).

Per-pixel labels go through exactly the same crop box and flip as their image and are resized
with nearest neighbour (PIL's sampling positions, computed in numpy), so a label keeps pointing
at the pixels it describes.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["open_image", "decode_image", "sample_crop_box", "crop_resize"]


def open_image(data, *, where: str) -> Image.Image:
  """Encoded PNG/JPEG bytes (or an already decoded array) -> RGB PIL image, pixels loaded.

  ``where`` names the record (dataset, split, id) in the error raised for a corrupt image.
  """
  if isinstance(data, np.ndarray) and data.dtype != object:
    return Image.fromarray(_rgb_array(data, where))
  if not isinstance(data, (bytes, bytearray)) or not data:
    raise ValueError(
        f"{where}: no image bytes (got {type(data).__name__} of length "
        f'{len(data) if hasattr(data, "__len__") else "?"})'
    )
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")
  except Exception as e:  # PIL raises several types for truncated or unknown data
    raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e


def decode_image(data, *, where: str) -> np.ndarray:
  """Encoded PNG/JPEG bytes (or an already decoded array) -> uint8 [H, W, 3].

  ``where`` names the record (dataset, split, id) in the error raised for a corrupt image.
  """
  if isinstance(data, np.ndarray) and data.dtype != object:
    return _rgb_array(data, where)
  return np.asarray(open_image(data, where=where))


def _rgb_array(array: np.ndarray, where: str) -> np.ndarray:
  """A decoded [H, W] or [H, W, 1|3|4] array as contiguous uint8 [H, W, 3]."""
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{where}: image has shape {array.shape}, expected [H, W, 1|3|4]")
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array[..., :3].astype(np.uint8, copy=False))


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scale: Sequence[float],
    ratio: Sequence[float],
    attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Random-resized-crop box (top, left, crop_height, crop_width), as in Inception/torchvision.

  Area fraction is uniform in ``scale``, aspect ratio log-uniform in ``ratio``; after
  ``attempts`` misses, falls back to the largest centred box within ``ratio``.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_w, crop_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    crop_h, crop_w = height, int(round(height * max(ratio)))
  else:
    crop_h, crop_w = height, width
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def crop_resize(
    image: np.ndarray | Image.Image,
    box: tuple[int, int, int, int] | None,
    size: int,
    *,
    nearest: bool = False,
) -> np.ndarray:
  """Crops ``box`` (None = whole image) and resizes to [size, size] (bicubic or nearest).

  ``image`` is an array [H, W, ...] or a PIL image; the result is an array. Bicubic resizing is
  PIL's; nearest neighbour picks the pixels PIL's would.
  """
  if isinstance(image, Image.Image):
    width, height = image.size
  else:
    height, width = image.shape[:2]
  top, left, crop_h, crop_w = box if box is not None else (0, 0, height, width)
  if (top, left, crop_h, crop_w) == (0, 0, height, width) and height == width == size:
    return np.asarray(image)
  if nearest:
    rows = _nearest_positions(top, crop_h, size)
    cols = _nearest_positions(left, crop_w, size)
    return np.asarray(image)[rows[:, None], cols]
  if not isinstance(image, Image.Image):
    image = Image.fromarray(image)
  box = (left, top, left + crop_w, top + crop_h)
  return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def _nearest_positions(start: int, length: int, size: int) -> np.ndarray:
  """Source indices of ``size`` nearest-neighbour samples of ``[start, start + length)``.

  As PIL's nearest resize: the first sample at ``start + step / 2``, each next one ``step``
  further (accumulated in float64, in order), truncated to an index.
  """
  step = length / size
  offsets = np.full(size, step)
  offsets[0] = start + step * 0.5
  return np.add.accumulate(offsets).astype(np.intp)
