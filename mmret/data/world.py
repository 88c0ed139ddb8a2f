"""The embedded world: generated image-text data whose ground truth is known.

Each *scene* places 2-4 objects on a 3x3 grid of a square image. An object is one fact,
``WorldObject(shape, colour, size, cell)``; ``cell`` is the grid cell, row-major from
the top left (0 = top left, 4 = center, 8 = bottom right), and one cell holds at most one
object. Within a scene, (colour, shape) pairs are unique so that "the red circle" names
one object. Shapes are drawn figures (``object_kind='shapes'``) or Fashion-MNIST garments
tinted by the colour (``object_kind='fashion'``).

A record's *content* (:class:`Content`) says what each modality carries:
- ``shown``: the objects drawn in the image;
- ``described``: the objects named in the text;
- ``text_facts``: facts only text can carry (owner, time, place, price).
The *intersection* is ``shown`` ∩ ``described``; *image-only* facts are shown but not
described; *text-only* facts are ``text_facts`` plus objects described but not shown.
Two records carry the same meaning when their fact sets (:meth:`Content.facts`, the
union over both modalities) are equal; all retrieval ground truth is defined that way.

Text follows a small, regular grammar: lower-case words separated by single spaces, no
punctuation, every word listed by :func:`vocabulary`. Attribute words (size, colour,
shape, position, text-fact values) are *content words*; all other words ("a", "at",
"owned", "dollars", ...) are template words.

Ground truth of training pairs:
- ``caption_tags`` int32 [n_words], one tag per whitespace-separated caption word:
  0 = template word, 1 = attribute word of an intersection object, 2 = word of a
  text-only fact (its value word; e.g. "alice" in "owned by alice").
- ``image_labels`` uint8 [H, W], one tag per pixel: 0 = background, 1 = pixel of an
  intersection object, 2 = pixel of an image-only object. For drawn shapes every
  labelled pixel has the object's colour and every 0 pixel the background colour; for
  garments a pixel is labelled when the garment's intensity exceeds
  ``WorldSpec.garment_threshold``.

Everything is a pure function of integer seeds: the same seed gives the same records.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

GRID = 3  # the position words below name the cells of a 3x3 grid
CELL_WORDS = (
    ("top", "left"),
    ("top",),
    ("top", "right"),
    ("left",),
    ("center",),
    ("right",),
    ("bottom", "left"),
    ("bottom",),
    ("bottom", "right"),
)
SIZES = ("small", "large")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Fashion-MNIST class index -> garment word (one word each; the grammar has no hyphens).
GARMENTS = (
    "top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
# Text-only facts: slot -> value words. Values are disjoint across slots and attributes.
TEXT_FACT_VALUES = {
    "owner": ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"),
    "time": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "place": ("kitchen", "garden", "office", "museum", "station", "harbor", "library", "market"),
    "price": ("five", "ten", "twenty", "fifty", "hundred"),
}

# Templates: "{...}" slots are filled with content words, other words are template words.
OBJECT_TEMPLATES = (
    "{article} {size} {colour} {shape} at the {position}",
    "{article} {colour} {shape} of {size} size at the {position}",
    "{article} {size} {colour} {shape} located at the {position}",
    "{article} {size} {shape} in {colour} at the {position}",
)
TEXT_FACT_TEMPLATES = {
    "owner": ("owned by {value}", "belonging to {value}", "from {value}"),
    "time": ("on {value}", "seen on {value}", "photographed on {value}"),
    "place": ("in the {value}", "found in the {value}", "kept in the {value}"),
    "price": ("priced at {value} dollars", "costing {value} dollars", "sold for {value} dollars"),
}
OPENINGS = ("", "a picture of", "an image with", "there is", "this shows")
CONNECTORS = ("and", "with", "plus")
# Composed-retrieval edits (task qit_ci): the text says how the target differs.
EDIT_TEMPLATES = {
    "add": "add {article} {size} {colour} {shape} at the {position}",
    "remove": "remove the {colour} {shape}",
    "recolour": "make the {colour} {shape} {new_colour}",
}
NEGATIVE_KINDS = ("intersection", "image_only", "text_only")

# Universal (M-BEIR-like) tasks: name -> (query modality, candidate modality, instruction).
UNIVERSAL_TASKS = {
    "qt_ci": ("text", "image", "find the image that matches this description"),
    "qi_ct": ("image", "text", "find the caption that describes this image"),
    "qt_ct": ("text", "text", "find another description of the same scene"),
    "qi_ci": ("image", "image", "find another picture of the same scene"),
    "qt_cit": ("text", "image,text", "find the picture and caption that match this description"),
    "qi_cit": ("image", "image,text", "find the picture and caption that show this image"),
    "qit_ct": ("image,text", "text", "find the full description of this picture and its details"),
    "qit_ci": ("image,text", "image", "find the image after this change"),
    "qit_cit": ("image,text", "image,text", "find the picture and caption with the same content"),
}

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_INSTALL_HINT = "apt-get install dataset-fashion-mnist"

# Integer stream ids, so that every split draws from its own random stream.
_TRAIN, _MM2MM, _UNIVERSAL, _CAPTION5, _MM2MM_VAL, _VAL = 1, 2, 3, 4, 5, 6
PAIR_STREAMS = {"train": _TRAIN, "val": _VAL}
# The MM2MM sets: the reported one and one held out for choosing settings.
MM2MM_STREAMS = {"mm2mm": _MM2MM, "mm2mm_val": _MM2MM_VAL}


@dataclasses.dataclass(frozen=True)
class WorldObject:
  """One object fact: what is drawn in grid cell ``cell``."""

  shape: str
  colour: str
  size: str
  cell: int


@dataclasses.dataclass(frozen=True)
class TextFact:
  """A fact an image cannot show, e.g. ``TextFact('owner', 'alice')``."""

  slot: str
  value: str


@dataclasses.dataclass(frozen=True)
class Content:
  """What a record carries: objects drawn, objects named, text-only facts."""

  shown: tuple[WorldObject, ...] = ()
  described: tuple[WorldObject, ...] = ()
  text_facts: tuple[TextFact, ...] = ()

  @property
  def intersection(self) -> tuple[WorldObject, ...]:
    return tuple(o for o in self.shown if o in self.described)

  @property
  def image_only(self) -> tuple[WorldObject, ...]:
    return tuple(o for o in self.shown if o not in self.described)

  @property
  def text_only(self) -> tuple[WorldObject | TextFact, ...]:
    return tuple(o for o in self.described if o not in self.shown) + self.text_facts

  def facts(self) -> frozenset:
    """The union of facts over both modalities (the record's meaning)."""
    return frozenset(self.shown) | frozenset(self.described) | frozenset(self.text_facts)

  def fact_kind(self, fact) -> str:
    """'intersection', 'image_only' or 'text_only' for one of this content's facts."""
    if fact in self.intersection:
      return "intersection"
    if fact in self.image_only:
      return "image_only"
    if fact in self.text_only:
      return "text_only"
    raise KeyError(f"{fact} is not a fact of {self}")


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """How scenes look. Defaults give 64x64 images legible at 32x32.

  Attributes:
    object_kind: 'shapes' (drawn figures) or 'fashion' (Fashion-MNIST garments).
    image_size: side of the square image in pixels.
    min_objects, max_objects: objects per scene (at least 2, so that a scene can hold
      an intersection and an image-only object; at most GRID**2).
    min_text_facts, max_text_facts: text-only facts per caption.
    small_extent, large_extent: object side as a fraction of a grid cell.
    colour_jitter: max per-channel deviation from an object's nominal colour.
    background_max: backgrounds are dark, each channel drawn in [0, background_max].
    garment_threshold: garment intensity (0-1) above which a pixel is labelled.
    fashion_dir: directory of the Fashion-MNIST idx .gz files.
  """

  object_kind: str = "shapes"
  image_size: int = 64
  min_objects: int = 2
  max_objects: int = 4
  min_text_facts: int = 1
  max_text_facts: int = 2
  small_extent: float = 0.5
  large_extent: float = 0.9
  colour_jitter: int = 12
  background_max: int = 40
  garment_threshold: float = 0.25
  fashion_dir: str = DEFAULT_FASHION_DIR

  def __post_init__(self):
    if self.object_kind not in ("shapes", "fashion"):
      raise ValueError(
          f"WorldSpec.object_kind must be 'shapes' or 'fashion', " f"got {self.object_kind!r}"
      )
    if not 2 <= self.min_objects <= self.max_objects <= GRID * GRID:
      raise ValueError(
          f"WorldSpec needs 2 <= min_objects <= max_objects <= {GRID * GRID}, "
          f"got {self.min_objects}, {self.max_objects}"
      )
    if not 1 <= self.min_text_facts <= self.max_text_facts <= len(TEXT_FACT_VALUES):
      raise ValueError(
          f"WorldSpec needs 1 <= min_text_facts <= max_text_facts <= "
          f"{len(TEXT_FACT_VALUES)}, got {self.min_text_facts}, "
          f"{self.max_text_facts}"
      )
    if not 0 < self.small_extent < self.large_extent <= 1:
      raise ValueError(
          f"WorldSpec needs 0 < small_extent < large_extent <= 1, got "
          f"{self.small_extent}, {self.large_extent}"
      )
    if self.image_size < 8 * GRID:
      raise ValueError(f"WorldSpec.image_size must be >= {8 * GRID}, got {self.image_size}")

  @property
  def shapes(self) -> tuple[str, ...]:
    return GARMENTS if self.object_kind == "fashion" else SHAPES


# ----------------------------------------------------------------------------- vocabulary


def _template_words(template: str) -> set[str]:
  return {w for w in template.split() if not w.startswith("{")}


def vocabulary(object_kind: str = "shapes") -> list[str]:
  """Sorted list of every word the grammar can produce for ``object_kind``."""
  shapes = GARMENTS if object_kind == "fashion" else SHAPES
  words = {"a", "an"} | set(SIZES) | set(COLOURS) | set(shapes)
  words |= {w for cell in CELL_WORDS for w in cell}
  for template in OBJECT_TEMPLATES + tuple(EDIT_TEMPLATES.values()):
    words |= _template_words(template)
  for slot, templates in TEXT_FACT_TEMPLATES.items():
    words |= set(TEXT_FACT_VALUES[slot])
    for template in templates:
      words |= _template_words(template)
  for phrase in OPENINGS + CONNECTORS:
    words |= set(phrase.split())
  for _, _, instruction in UNIVERSAL_TASKS.values():
    words |= set(instruction.split())
  return sorted(words)


# ----------------------------------------------------------------------------- sampling


def _child_seed(*keys: int) -> int:
  """A 63-bit seed derived from integer keys (independent streams per key tuple)."""
  return int(
      np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1)
  )


def _pick(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def _sample_object(rng, spec: WorldSpec, cell: int, taken: set) -> WorldObject:
  """A random object in ``cell`` whose (colour, shape) is not in ``taken``."""
  while True:
    colour, shape = _pick(rng, tuple(COLOURS)), _pick(rng, spec.shapes)
    if (colour, shape) not in taken:
      return WorldObject(shape, colour, _pick(rng, SIZES), cell)


def _sample_text_facts(rng, spec: WorldSpec) -> tuple[TextFact, ...]:
  count = int(rng.integers(spec.min_text_facts, spec.max_text_facts + 1))
  slots = rng.choice(len(TEXT_FACT_VALUES), count, replace=False)
  names = tuple(TEXT_FACT_VALUES)
  return tuple(TextFact(names[s], _pick(rng, TEXT_FACT_VALUES[names[s]])) for s in sorted(slots))


def sample_content(
    rng: np.random.Generator, spec: WorldSpec, *, min_image_only: int = 0
) -> Content:
  """A random scene and caption content.

  The caption describes 1 to n of the n objects (all described objects are shown), and
  at least ``min_image_only`` objects stay undescribed.
  """
  count = int(rng.integers(max(spec.min_objects, min_image_only + 1), spec.max_objects + 1))
  cells = sorted(int(c) for c in rng.choice(GRID * GRID, count, replace=False))
  objects, taken = [], set()
  for cell in cells:
    obj = _sample_object(rng, spec, cell, taken)
    taken.add((obj.colour, obj.shape))
    objects.append(obj)
  num_described = int(rng.integers(1, count - min_image_only + 1))
  described_idx = set(int(i) for i in rng.choice(count, num_described, replace=False))
  described = tuple(o for i, o in enumerate(objects) if i in described_idx)
  return Content(tuple(objects), described, _sample_text_facts(rng, spec))


def move_between_modalities(content: Content, rng: np.random.Generator) -> Content:
  """Same facts, one object moved between modalities (the MM2MM positive's content).

  Moves: 'mention' an image-only object in the text, 'omit' an intersection object from
  the text (only if another object stays described), or 'hide' an intersection object
  from the image, keeping it in the text (only if another object stays shown).
  """
  moves = []
  if content.image_only:
    moves.append("mention")
  if content.intersection and len(content.described) >= 2:
    moves.append("omit")
  if content.intersection and len(content.shown) >= 2:
    moves.append("hide")
  if not moves:
    raise ValueError(f"no object of {content} can move between modalities")
  move = _pick(rng, moves)
  if move == "mention":
    obj = _pick(rng, content.image_only)
    described = tuple(o for o in content.shown if o in content.described or o == obj)
    return dataclasses.replace(content, described=described)
  obj = _pick(rng, content.intersection)
  if move == "omit":
    return dataclasses.replace(content, described=tuple(o for o in content.described if o != obj))
  return dataclasses.replace(content, shown=tuple(o for o in content.shown if o != obj))


def _changed_object(
    obj: WorldObject, others: Sequence[WorldObject], rng, spec: WorldSpec
) -> WorldObject:
  """``obj`` with one of colour/shape/size changed, keeping (colour, shape) unique."""
  taken = {(o.colour, o.shape) for o in others if o.cell != obj.cell}
  while True:
    attribute = _pick(rng, ("colour", "shape", "size"))
    values = {"colour": tuple(COLOURS), "shape": spec.shapes, "size": SIZES}[attribute]
    value = _pick(rng, tuple(v for v in values if v != getattr(obj, attribute)))
    new = dataclasses.replace(obj, **{attribute: value})
    if (new.colour, new.shape) not in taken:
      return new


def change_one_fact(
    content: Content, kind: str, rng: np.random.Generator, spec: WorldSpec
) -> Content:
  """``content`` with exactly one fact of ``kind`` (see NEGATIVE_KINDS) changed.

  The changed fact stays in the same modalities: an intersection object changes in both
  image and text, an image-only object in the image, a text-only fact in the text.
  """
  if kind == "text_only":
    if not content.text_facts:
      raise ValueError(f"{content} has no text-only fact to change")
    index = int(rng.integers(len(content.text_facts)))
    old = content.text_facts[index]
    new = TextFact(
        old.slot, _pick(rng, tuple(v for v in TEXT_FACT_VALUES[old.slot] if v != old.value))
    )
    facts = content.text_facts[:index] + (new,) + content.text_facts[index + 1 :]
    return dataclasses.replace(content, text_facts=facts)
  if kind == "intersection":
    pool = content.intersection
  elif kind == "image_only":
    pool = content.image_only
  else:
    raise ValueError(f"unknown negative kind {kind!r}; expected one of {NEGATIVE_KINDS}")
  if not pool:
    raise ValueError(f"{content} has no {kind} object to change")
  old = _pick(rng, pool)
  new = _changed_object(old, content.shown + content.described, rng, spec)
  swap = lambda objs: tuple(new if o == old else o for o in objs)
  return dataclasses.replace(content, shown=swap(content.shown), described=swap(content.described))


def apply_edit(
    shown: tuple[WorldObject, ...], rng: np.random.Generator, spec: WorldSpec
) -> tuple[str, tuple[WorldObject, ...]]:
  """A composed-retrieval edit of a scene: (edit text, edited objects)."""
  taken = {(o.colour, o.shape) for o in shown}
  free = [c for c in range(GRID * GRID) if c not in {o.cell for o in shown}]
  kinds = [
      k
      for k, possible in (
          ("add", bool(free)),
          ("remove", len(shown) >= 2),
          ("recolour", bool(shown)),
      )
      if possible
  ]
  if not kinds:
    raise ValueError(f"no edit applies to a scene of {len(shown)} objects")
  kind = _pick(rng, kinds)
  if kind == "add":
    obj = _sample_object(rng, spec, _pick(rng, free), taken)
    edited = tuple(sorted(shown + (obj,), key=lambda o: o.cell))
    return _fill(EDIT_TEMPLATES["add"], obj), edited
  if kind == "remove":
    obj = _pick(rng, shown)
    return _fill(EDIT_TEMPLATES["remove"], obj), tuple(o for o in shown if o != obj)
  # Keep (colour, shape) pairs unique: only objects whose shape has a free colour.
  recolourable = [o for o in shown if any((c, o.shape) not in taken for c in COLOURS)]
  obj = _pick(rng, recolourable)
  colours = tuple(c for c in COLOURS if (c, obj.shape) not in taken)
  new = dataclasses.replace(obj, colour=_pick(rng, colours))
  text = _fill(EDIT_TEMPLATES["recolour"], obj, new_colour=new.colour)
  return text, tuple(new if o == obj else o for o in shown)


# ----------------------------------------------------------------------------- text


def _fill(template: str, obj: WorldObject, **extra: str) -> str:
  return " ".join(_fill_tagged(template, obj, 0, **extra)[0])


def _fill_tagged(
    template: str, obj: WorldObject | None, tag: int, **values: str
) -> tuple[list[str], list[int]]:
  """Words and tags of one filled template; slot words get ``tag``, others 0."""
  if obj is not None:
    values = dict(
        size=obj.size,
        colour=obj.colour,
        shape=obj.shape,
        position=" ".join(CELL_WORDS[obj.cell]),
        **values,
    )
  words, tags = [], []
  for token in template.split():
    if token.startswith("{") and token != "{article}":
      slot_words = values[token[1:-1]].split()
      words += slot_words
      tags += [tag] * len(slot_words)
    else:
      words.append(token)
      tags.append(0)
  for i, word in enumerate(words):
    if word == "{article}":  # the article agrees with the word after it
      words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
  return words, tags


def describe(content: Content, seed: int) -> tuple[list[str], list[int]]:
  """Caption words and per-word tags for the text side of ``content``.

  Phrasing (opening, object order, templates, connectors) comes from ``seed``; the
  random draws depend only on how many objects and facts there are, so two contents
  that differ in one attribute value get the same phrasing from the same seed.
  Tags: 1 = attribute word of a described object that is also shown, 2 = attribute word
  of a described object that is not shown or value word of a text fact, 0 = the rest.
  """
  rng = np.random.default_rng(seed)
  words = _pick(rng, OPENINGS).split()
  tags = [0] * len(words)
  order = np.argsort(rng.random(len(content.described)), kind="stable")
  for n, i in enumerate(order):
    obj = content.described[int(i)]
    connector = _pick(rng, CONNECTORS)  # drawn for every object: a fixed number of draws
    if n:
      words.append(connector)
      tags.append(0)
    part = _fill_tagged(_pick(rng, OBJECT_TEMPLATES), obj, 1 if obj in content.shown else 2)
    words += part[0]
    tags += part[1]
  order = np.argsort(rng.random(len(content.text_facts)), kind="stable")
  for i in order:
    fact = content.text_facts[int(i)]
    part = _fill_tagged(_pick(rng, TEXT_FACT_TEMPLATES[fact.slot]), None, 2, value=fact.value)
    words += part[0]
    tags += part[1]
  return words, tags


# ----------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(
    directory: str = DEFAULT_FASHION_DIR, subset: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST ``subset`` ('train' or 't10k') as (images uint8 [N,28,28], labels [N])."""
  if subset not in ("train", "t10k"):
    raise ValueError(f"Fashion-MNIST subset must be 'train' or 't10k', got {subset!r}")
  paths = [
      os.path.join(directory, f"{subset}-{kind}-idx{dim}-ubyte.gz")
      for kind, dim in (("images", 3), ("labels", 1))
  ]
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"Fashion-MNIST file {path} not found; install the Debian package with "
          f"`{FASHION_INSTALL_HINT}` (or set WorldSpec.fashion_dir)"
      )
  with gzip.open(paths[0], "rb") as f:
    raw = f.read()
  images = np.frombuffer(raw, np.uint8, offset=16)
  with gzip.open(paths[1], "rb") as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  if images.size != labels.size * 28 * 28:
    raise ValueError(
        f"Fashion-MNIST files in {directory} disagree: {images.size} pixels "
        f"for {labels.size} labels"
    )
  return images.reshape(-1, 28, 28), labels


@functools.lru_cache(maxsize=4)
def _garments_by_class(directory: str, subset: str) -> tuple[np.ndarray, ...]:
  images, labels = load_fashion_mnist(directory, subset)
  return tuple(images[labels == c] for c in range(len(GARMENTS)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill):
  x0, y0, x1, y1 = box
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  elif shape == "triangle":
    draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
  elif shape == "diamond":
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
  elif shape == "cross":
    arm = max(1, round((x1 - x0) * 0.18))
    draw.rectangle((x0, round(cy) - arm, x1, round(cy) + arm), fill=fill)
    draw.rectangle((round(cx) - arm, y0, round(cx) + arm, y1), fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}")


def render(
    content: Content, spec: WorldSpec, seed: int, *, fashion_subset: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
  """Draw ``content.shown``: (image uint8 [S,S,3], labels uint8 [S,S]).

  Labels are 1 for objects that are also described, 2 for image-only objects, 0 for
  background. Nuisances (background shade, jitter inside the cell, colour jitter, the
  garment instance) come from ``seed`` with a fixed number of draws per object, so
  contents differing in one attribute render identically elsewhere from the same seed.
  ``fashion_subset`` picks the Fashion-MNIST half garments are drawn from.
  """
  rng = np.random.default_rng(seed)
  size = spec.image_size
  background = np.floor(rng.random(3) * (spec.background_max + 1)).astype(np.uint8)
  image = np.empty((size, size, 3), np.uint8)
  image[:] = background
  labels = np.zeros((size, size), np.uint8)
  cell = size / GRID
  for obj in sorted(content.shown, key=lambda o: o.cell):
    draws = rng.random(6)  # jitter x, jitter y, colour jitter x3, garment instance
    extent = max(3, int(cell * (spec.large_extent if obj.size == "large" else spec.small_extent)))
    slack = max(0, int(cell) - extent) // 2
    row, col = divmod(obj.cell, GRID)
    x0 = int(col * cell + (cell - extent) / 2) + int(np.floor((2 * draws[0] - 1) * slack + 0.5))
    y0 = int(row * cell + (cell - extent) / 2) + int(np.floor((2 * draws[1] - 1) * slack + 0.5))
    x0, y0 = min(max(x0, 0), size - extent), min(max(y0, 0), size - extent)
    jitter = np.floor((2 * draws[2:5] - 1) * spec.colour_jitter + 0.5)
    colour = np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255).astype(np.uint8)
    tag = 1 if obj in content.described else 2
    if spec.object_kind == "fashion":
      instances = _garments_by_class(spec.fashion_dir, fashion_subset)[GARMENTS.index(obj.shape)]
      garment = instances[int(draws[5] * len(instances))]
      alpha = np.asarray(
          Image.fromarray(garment).resize((extent, extent), Image.BILINEAR), np.float32
      )
      alpha /= max(float(alpha.max()), 1.0)  # full tint at the garment's brightest pixel
      patch = image[y0 : y0 + extent, x0 : x0 + extent].astype(np.float32)
      blend = patch * (1 - alpha[..., None]) + colour.astype(np.float32) * alpha[..., None]
      image[y0 : y0 + extent, x0 : x0 + extent] = np.round(blend).astype(np.uint8)
      region = labels[y0 : y0 + extent, x0 : x0 + extent]
      region[alpha > spec.garment_threshold] = tag
    else:
      mask = Image.new("L", (size, size), 0)
      _draw_shape(ImageDraw.Draw(mask), obj.shape, (x0, y0, x0 + extent - 1, y0 + extent - 1), 255)
      inside = np.asarray(mask) > 0
      image[inside] = colour
      labels[inside] = tag
  return image, labels


def encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ----------------------------------------------------------------------------- splits


def pairs(
    spec: WorldSpec, seed: int, count: int, *, start: int = 0, name: str = "train"
) -> Iterator[dict]:
  """Training pairs (PAIRS schema with ground truth), one independent stream per index.

  ``name`` 'val' draws held-out pairs of the same kind from their own streams (pairs no model
  trained on, e.g. to measure masks without memorisation). Record: ``id`` '<name>-NNNNNNN',
  ``image`` PNG bytes, ``caption`` str, ``caption_tags``
  int32 [n_words], ``image_labels`` uint8 [S,S] (conventions in the module docstring).
  """
  if name not in PAIR_STREAMS:
    raise ValueError(f"unknown pairs set {name!r}; expected one of {sorted(PAIR_STREAMS)}")
  for index in range(start, start + count):
    rng = np.random.default_rng(_child_seed(seed, PAIR_STREAMS[name], index))
    content = sample_content(rng, spec)
    image, labels = render(content, spec, int(rng.integers(2**62)), fashion_subset="train")
    words, tags = describe(content, int(rng.integers(2**62)))
    yield {
        "id": f"{name}-{index:07d}",
        "image": encode_png(image),
        "caption": " ".join(words),
        "caption_tags": np.asarray(tags, np.int32),
        "image_labels": labels,
    }


@dataclasses.dataclass
class RetrievalSet:
  """Query and candidate records of a retrieval split plus their known contents.

  ``contents`` maps every record id to what the record carries (for a composed-edit
  query, the reference image's content); ``targets`` maps each query id to the fact set
  its positives carry.
  """

  queries: list[dict]
  candidates: list[dict]
  contents: dict[str, Content]
  targets: dict[str, frozenset]


class _RecordMaker:
  """Turns contents into retrieval records (RETRIEVAL schema fields) for one split."""

  def __init__(self, spec: WorldSpec, rng: np.random.Generator):
    self.spec, self.rng = spec, rng

  def seeds(self) -> tuple[int, int]:
    return int(self.rng.integers(2**62)), int(self.rng.integers(2**62))

  def record(
      self,
      record_id: str,
      content: Content,
      modality: str,
      pool: str,
      seeds: tuple[int, int] | None = None,
      text: str | None = None,
  ) -> dict:
    render_seed, phrase_seed = seeds or self.seeds()
    image = b""
    if "image" in modality.split(","):
      image = encode_png(render(content, self.spec, render_seed, fashion_subset="t10k")[0])
    if text is None:
      text = " ".join(describe(content, phrase_seed)[0]) if "text" in modality.split(",") else ""
    return {"id": record_id, "image": image, "text": text, "modality": modality, "pool": pool}


def _query(
    record: dict,
    *,
    task: str,
    instruction: str = "",
    positive_ids=(),
    negative_id: str = "",
    negative_kind: str = "",
) -> dict:
  return dict(
      record,
      task=task,
      instruction=instruction,
      positive_ids=list(positive_ids),
      candidate_ids=[],
      negative_id=negative_id,
      negative_kind=negative_kind,
  )


def _finish_pool(
    rng: np.random.Generator, pool: str, entries: list[tuple[Content, dict]], contents: dict
) -> tuple[list[dict], list[str]]:
  """Shuffle a pool's candidates and give them opaque ids '<pool>-cNNNNN'.

  Returns the records in pool order and, for each entry, the id it received.
  """
  order = rng.permutation(len(entries))
  records, ids = [], [""] * len(entries)
  for new_index, old_index in enumerate(order):
    content, record = entries[int(old_index)]
    record = dict(record, id=f"{pool}-c{new_index:05d}")
    contents[record["id"]] = content
    records.append(record)
    ids[int(old_index)] = record["id"]
  return records, ids


def mm2mm(
    spec: WorldSpec, seed: int, num_triplets: int, num_distractors: int, *, name: str = "mm2mm"
) -> RetrievalSet:
  """MM2MM triplets (anchor query, positive, hard negative) in a distractor pool.

  ``name`` 'mm2mm' is the reported set, 'mm2mm_val' the held-out one (its own random stream, so
  its triplets and pool differ) on which settings are chosen. Every record is an image+text pair in
  pool ``name`` (task 'mm2mm'). The anchor has at
  least one intersection object, one image-only object and one text-only fact. The
  positive carries the same facts, re-rendered (new jitter, colours, background,
  garment instances) and re-phrased, with one object moved between modalities
  (:func:`move_between_modalities`). The hard negative is the anchor rendered and
  phrased with the anchor's own seeds but with one fact changed; ``negative_kind``
  cycles through NEGATIVE_KINDS (balanced thirds). No candidate other than the
  positive carries an anchor's facts; anchors are not candidates.
  """
  if name not in MM2MM_STREAMS:
    raise ValueError(f"unknown MM2MM set {name!r}; expected one of {sorted(MM2MM_STREAMS)}")
  rng = np.random.default_rng(_child_seed(seed, MM2MM_STREAMS[name]))
  maker = _RecordMaker(spec, rng)
  anchor_facts, entries, queries, contents, targets = set(), [], [], {}, {}
  plans = []
  for index in range(num_triplets):
    anchor = sample_content(rng, spec, min_image_only=1)
    while anchor.facts() in anchor_facts:
      anchor = sample_content(rng, spec, min_image_only=1)
    anchor_facts.add(anchor.facts())
    plans.append((index, anchor))
  for index, anchor in plans:
    kind = NEGATIVE_KINDS[index % len(NEGATIVE_KINDS)]
    positive = move_between_modalities(anchor, rng)
    negative = change_one_fact(anchor, kind, rng, spec)
    while negative.facts() in anchor_facts:
      negative = change_one_fact(anchor, kind, rng, spec)
    anchor_seeds = maker.seeds()
    query_id = f"{name}-q{index:05d}"
    query = maker.record(query_id, anchor, "image,text", name, anchor_seeds)
    contents[query_id], targets[query_id] = anchor, anchor.facts()
    positive_entry = (positive, maker.record("", positive, "image,text", name))
    negative_entry = (negative, maker.record("", negative, "image,text", name, anchor_seeds))
    queries.append((query, kind, len(entries), len(entries) + 1))
    entries += [positive_entry, negative_entry]
  for _ in range(num_distractors):
    content = sample_content(rng, spec)
    while content.facts() in anchor_facts:
      content = sample_content(rng, spec)
    entries.append((content, maker.record("", content, "image,text", name)))
  candidates, ids = _finish_pool(rng, name, entries, contents)
  query_records = [
      _query(query, task="mm2mm", positive_ids=[ids[pos]], negative_id=ids[neg], negative_kind=kind)
      for query, kind, pos, neg in queries
  ]
  return RetrievalSet(query_records, candidates, contents, targets)


def _universal_example(task: str, scene: Content, rng, spec: WorldSpec):
  """(query content, query text or None, target facts, positive content) for one task.

  A query text of None means "describe the query content"; composed edits give text.
  """
  objects_only = Content(described=scene.shown)
  full_text = Content(described=scene.shown, text_facts=scene.text_facts)
  image_only = Content(shown=scene.shown)
  if task == "qt_ci":
    return objects_only, None, image_only.facts(), image_only
  if task == "qi_ct":
    return image_only, None, objects_only.facts(), objects_only
  if task == "qt_ct":
    return full_text, None, full_text.facts(), full_text
  if task == "qi_ci":
    return image_only, None, image_only.facts(), image_only
  if task == "qt_cit":
    return full_text, None, scene.facts(), scene
  if task == "qi_cit":
    pair = dataclasses.replace(scene, text_facts=())
    return image_only, None, pair.facts(), pair
  if task == "qit_ct":
    return scene, None, full_text.facts(), full_text
  if task == "qit_ci":
    text, edited = apply_edit(scene.shown, rng, spec)
    return image_only, text, frozenset(edited), Content(shown=edited)
  if task == "qit_cit":
    return scene, None, scene.facts(), move_between_modalities(scene, rng)
  raise ValueError(f"unknown universal task {task!r}; expected one of {tuple(UNIVERSAL_TASKS)}")


def _candidate_form(task: str, scene: Content, rng) -> Content:
  """A distractor for ``task``'s pool: a random scene in the candidate's form."""
  if task in ("qt_ci", "qi_ci", "qit_ci"):
    return Content(shown=scene.shown)
  if task == "qi_ct":
    return Content(described=scene.shown)
  if task in ("qt_ct", "qit_ct"):
    return Content(described=scene.shown, text_facts=scene.text_facts)
  if task == "qi_cit":
    return dataclasses.replace(scene, text_facts=())
  if task == "qit_cit":
    return move_between_modalities(scene, rng)
  return scene  # qt_cit


def universal(
    spec: WorldSpec, seed: int, queries_per_task: int, distractors_per_task: int
) -> RetrievalSet:
  """M-BEIR-like mixed-modality retrieval with one local pool per task.

  Tasks are UNIVERSAL_TASKS (``task`` = pool name, e.g. 'qt_ci': text query, image
  candidates); the global pool is all candidates. A query's ``positive_ids`` are all
  candidates of its local pool whose fact set equals the query's target; the pool holds
  each query's own positive plus ``distractors_per_task`` random candidates of the same
  form. Composed-edit queries (qit_ci) also put their reference image in the pool as a
  hard negative.
  """
  queries, candidates, contents, targets = [], [], {}, {}
  for task_index, (task, (query_modality, candidate_modality, instruction)) in enumerate(
      UNIVERSAL_TASKS.items()
  ):
    rng = np.random.default_rng(_child_seed(seed, _UNIVERSAL, task_index))
    maker = _RecordMaker(spec, rng)
    entries, task_queries = [], []
    for index in range(queries_per_task):
      scene = sample_content(rng, spec, min_image_only=1)
      query_content, text, target, positive = _universal_example(task, scene, rng, spec)
      query_id = f"{task}-q{index:05d}"
      query_seeds = maker.seeds()
      task_queries.append(
          maker.record(query_id, query_content, query_modality, task, query_seeds, text=text)
      )
      contents[query_id], targets[query_id] = query_content, target
      positive_record = maker.record("", positive, candidate_modality, task)
      while positive_record["text"] and positive_record["text"] == task_queries[-1]["text"]:
        positive_record = maker.record("", positive, candidate_modality, task)  # re-phrase
      entries.append((positive, positive_record))
      if task == "qit_ci":
        # The unedited reference picture is a hard negative.
        entries.append((query_content, maker.record("", query_content, "image", task, query_seeds)))
    for _ in range(distractors_per_task):
      content = _candidate_form(task, sample_content(rng, spec, min_image_only=1), rng)
      entries.append((content, maker.record("", content, candidate_modality, task)))
    pool, _ = _finish_pool(rng, task, entries, contents)
    by_facts: dict[frozenset, list[str]] = {}
    for record in pool:
      by_facts.setdefault(contents[record["id"]].facts(), []).append(record["id"])
    for record in task_queries:
      queries.append(
          _query(
              record,
              task=task,
              instruction=instruction,
              positive_ids=by_facts[targets[record["id"]]],
          )
      )
    candidates += pool
  return RetrievalSet(queries, candidates, contents, targets)


def caption5(
    spec: WorldSpec, seed: int, count: int, *, captions_per_image: int = 5, max_tries: int = 200
) -> Iterator[dict]:
  """Flickr-style records: ``id`` 'caption5-NNNNN', ``image`` PNG bytes, ``captions``.

  Each caption describes a random non-empty subset of the image's objects (in any order
  and phrasing) and a random subset of the scene's text-only facts; the captions of one
  image are distinct.
  """
  for index in range(count):
    rng = np.random.default_rng(_child_seed(seed, _CAPTION5, index))
    scene = sample_content(rng, spec)
    image, _ = render(scene, spec, int(rng.integers(2**62)), fashion_subset="t10k")
    captions = []
    for _ in range(max_tries):
      if len(captions) == captions_per_image:
        break
      num_objects = int(rng.integers(1, len(scene.shown) + 1))
      keep = set(int(i) for i in rng.choice(len(scene.shown), num_objects, replace=False))
      facts = tuple(f for f in scene.text_facts if rng.random() < 0.5)
      caption = Content(
          shown=scene.shown,
          described=tuple(o for i, o in enumerate(scene.shown) if i in keep),
          text_facts=facts,
      )
      text = " ".join(describe(caption, int(rng.integers(2**62)))[0])
      if text not in captions:
        captions.append(text)
    if len(captions) < captions_per_image:
      raise RuntimeError(
          f"caption5-{index:05d}: found only {len(captions)} distinct "
          f"captions in {max_tries} tries"
      )
    yield {"id": f"caption5-{index:05d}", "image": encode_png(image), "captions": captions}
