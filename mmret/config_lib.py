"""What recipe configs (``configs/*.py``) build on: the base config and argument parsing.

Every recipe starts from :func:`base_config` (Flax's ``default.py`` pattern) and overrides what
it needs; config files import only ``mmret``, so ``--config=/abs/path/configs/solar.py`` works from
any working directory. Common knobs every recipe has: seed, total_steps, input.batch_size
(global), log_every, eval_every, ckpt_every, model.size; and the arguments ``data`` / ``split``
(:data:`DATA_ARGS`, :func:`use_data`): train on a dataset made by ``python -m mmret.prepare``.
"""

import dataclasses
import json
import os

import ml_collections
from absl import logging
from etils import epath

from mmret.data import pipeline, sources
from mmret.models import sizes


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses a config string argument 'k1=v1,k2=v2' (e.g. 'size=tiny') against typed defaults.

  Booleans accept true/false, yes/no and 1/0 (anything else is an error naming the value).
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} is not of the form key=value")
    if key not in parsed:
      raise KeyError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(
            f"config argument {key}={value!r} is not a boolean: use true/false, yes/no or 1/0"
        )
      parsed[key] = value.lower() in ("1", "true", "yes")
    else:
      try:
        parsed[key] = kind(value)
      except ValueError:
        raise ValueError(
            f"config argument {key}={value!r} is not a {kind.__name__} (default: {defaults[key]!r})"
        ) from None
  return parsed


# Types of the architecture fields a size fills (None in the config until then): typed so that
# ``--config.model.embed_dim=32`` and the like can be given on the command line.
_ARCH_TYPES = dict(
    width=int,
    depth=int,
    heads=int,
    mlp_dim=int,
    patch_size=int,
    embed_dim=int,
    kind=str,
    activation=str,
    ln_eps=float,
    ln_pre=bool,
    layer_scale=bool,
)


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """The retrieval model. Architecture fields left None come from ``size`` (mmret/models/sizes.py).

  Tower fields beyond the transformer shape (None = the size's value, else the tower default):
    image.kind      'vit' (default) | 'efficientnet_lite0'
    image.ln_pre    LayerNorm before the blocks (CLIP); image.layer_scale: DINOv2's residual scales
    text.kind       'transformer' (pre-LN, default) | 'bert' (post-LN)
    {image,text}.activation  'gelu' (default) | 'quick_gelu' (OpenAI CLIP) | 'gelu_tanh'
    {image,text}.ln_eps      LayerNorm epsilon (default 1e-6 for 'vit'/'transformer', 1e-12 'bert')
  Sizes named after a checkpoint (e.g. 'clip_vit_b16', 'minilm_l6_efficientnet_lite0') also set
  the pooling/causal fields below to what the checkpoint needs.
  lora.rank > 0 tunes the kernels matching the regex lora.targets as W + (lora.alpha / lora.rank)
  * A @ B (mmret.lora). Usual recipe: freeze the towers and adapt their kernels, e.g.
  optim.freeze='^(image|text)_tower/', lora.rank=8,
  lora.targets='^text_tower/.*(query|value)/kernel$'.
  """
  arch = lambda *keys: {  # noqa: E731
      k: ml_collections.FieldReference(None, field_type=_ARCH_TYPES[k]) for k in keys
  }
  cfg = ml_collections.ConfigDict(
      dict(
          size=size,
          image=arch(
              "width",
              "depth",
              "heads",
              "mlp_dim",
              "patch_size",
              "kind",
              "activation",
              "ln_eps",
              "ln_pre",
              "layer_scale",
          ),
          text=arch("width", "depth", "heads", "mlp_dim", "kind", "activation", "ln_eps"),
          joint=arch("depth", "heads", "mlp_dim"),
          embed_dim=ml_collections.FieldReference(None, field_type=int),
          image_pool="cls",  # 'cls' | 'gap'
          text_pool="eos",  # 'eos' | 'cls' | 'mean'
          text_causal=False,
          joint_kind="fusion",  # 'fusion' (normalised sum) | 'encoder' (joint transformer CLS)
          unimodal="tower",  # 'tower' | 'joint'
          adapter="linear",  # 'linear' | 'mlp'
          temperature_init=0.07,
          num_prototypes=0,  # SelfAlign concept prototypes (0 = none)
          dropout=0.0,
          dtype="float32",  # compute dtype; parameters stay float32
          init="",  # pretrained checkpoint(s) to start from (see mmret.models.pretrained)
          # LoRA of kernels (see mmret.lora): rank 0 = off; targets: regex over kernel paths.
          lora=dict(rank=0, alpha=16.0, targets=""),
      )
  )
  cfg.update(sizes.model_defaults(size))
  return cfg


def optim_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(
      dict(
          lr=1e-3,
          warmup_steps=50,
          schedule="cosine",  # 'cosine' | 'constant'
          end_lr_factor=0.0,
          b1=0.9,
          b2=0.98,
          eps=1e-6,
          weight_decay=0.1,
          clip_norm=1.0,
          freeze="",  # regex over parameter paths; matches get no updates
          lr_mults=(),  # ((regex, multiplier), ...)
          # GradCache (mmret.gradcache): the full-batch gradient from this many micro-batches per
          # device, for per-example forwards (contrastive, selfalign); 1 = off.
          microbatches=1,
      )
  )
  cfg.update(overrides)
  return cfg


def base_config(
    *, size: str = "tiny", world: str = "tiny", steps: int = 600
) -> ml_collections.ConfigDict:
  """The contrastive recipe every config starts from: CLIP's image <-> text InfoNCE, trained on the
  embedded world ``mmret_world/<world>`` for ``steps`` steps, model ``size``, no evaluations."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = steps
  config.log_every = 50
  config.eval_every = 200
  config.ckpt_every = 200
  config.keep_ckpts = 2
  # 'shard_map' | 'pmap'. The same step either way (tested); pmap's compiled step copies every
  # parameter and ran the tiny benchmark 1.3-2x slower (benchmarks/step.py, README).
  config.mapping = "shard_map"

  config.input = pipeline.default_input_config()
  config.input.train = [{"dataset": f"mmret_world/{world}", "split": "train", "weight": 1.0}]
  config.input.batch_size = 64
  if size != "tiny":
    config.input.image_size = 64

  config.model = model_config(size)
  config.optim = optim_config(lr=1e-3 if size == "tiny" else 5e-4, warmup_steps=50)
  config.method = ml_collections.ConfigDict({"name": "contrastive"})
  config.loss = ml_collections.ConfigDict({"name": "clip"})
  config.evals = ml_collections.ConfigDict()
  return config


def contrastive_loss_impl(loss_cfg, impl: str = "dense", block_size: int = 512):
  """Declares ``impl`` ('dense': the [N, N] logits; 'chunked' / 'ring': blockwise, flat memory,
  mmret/losses/chunked.py) and ``block_size`` in a loss config whose losses take them (clip, gcl,
  pairwise, vsepp, SOLAR stage 2), so ``--config.loss.impl=chunked`` overrides them."""
  loss_cfg.impl = impl
  loss_cfg.block_size = block_size
  return loss_cfg


def check_choice(recipe: str, name: str, value, choices):
  """A config argument outside its choices is an error naming the recipe, argument and choices."""
  if value not in choices:
    raise ValueError(f"{recipe} config: {name} must be one of {tuple(choices)}, got {value!r}")


# ImageNet statistics (the EfficientNet-Lite0 checkpoint's preprocessing).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHIPPED_SIZE = "minilm_l6_efficientnet_lite0"
TOWERS = ("scratch", "shipped")


def use_shipped_towers(
    config, *, image_size: int = 128, freeze_towers: bool = True, tower_lr_mult: float = 0.1
):
  """Starts ``config``'s towers from the real weights pip packages ship (``towers=shipped``).

  EfficientNet-Lite0 (ImageNet) as the image tower and all-MiniLM-L6-v2 as the text tower, with
  MiniLM's WordPiece vocabulary and ImageNet normalisation. ``config.model.size`` must be
  ``minilm_l6_efficientnet_lite0``. At 128 px the last feature map is 4x4, the patch grid of the
  from-scratch tiny ViT (32 px, 8 px patches). With ``freeze_towers`` (the default, so that the
  recipes run on a CPU in minutes) the towers stay fixed and only their backward-free forward
  pass runs; adapters, projections and the joint encoder train. Otherwise
  (``--config.optim.freeze=''``) the towers are tuned lightly, at ``tower_lr_mult`` times the
  learning rate. Needs ``pip install -e '.[pretrained]'``.
  """
  from mmret.models import pretrained  # only these runs need the shipped packages

  if config.model.size != SHIPPED_SIZE:
    raise ValueError(f"towers=shipped needs model.size={SHIPPED_SIZE!r}, got {config.model.size!r}")
  paths = pretrained.shipped_checkpoints()
  config.model.init = (
      f"efficientnet_lite0:{paths['efficientnet_lite0']}," f"bert:{paths['minilm_l6']}"
  )
  config.input.tokenizer = f"wordpiece:{paths['minilm_l6_vocab']}"
  config.input.image_size = image_size
  config.input.mean, config.input.std = IMAGENET_MEAN, IMAGENET_STD
  config.optim.lr_mults = ((r"^(image|text)_tower/", tower_lr_mult),)
  if freeze_towers:
    config.optim.freeze = r"^(image|text)_tower/"
  return config


# ----------------------------------------------------------------------------------------------
# Training on a prepared dataset: the ``data`` and ``split`` arguments of every recipe.

# Config arguments every recipe takes (``parse_arg(arg, ..., **DATA_ARGS)``): ``data`` a dataset
# directory made by ``python -m mmret.prepare``, or ``DIR/SPLIT`` (empty: the embedded world);
# ``split`` its training split (empty: chosen by :func:`resolve_data`).
DATA_ARGS = dict(data="", split="")
WORLD_PREFIX = "mmret_world/"
# Kinds of split, told by the fields a split's records hold (mmret.data.importers.schema).
PAIRS, CAPTION5, QUERIES, CANDIDATES = "pairs", "caption5", "queries", "candidates"
# The evaluator of a dataset's ``<name>_queries`` / ``<name>_candidates`` splits, by the format it
# was imported from (``import_summary.json``); other formats' (M-BEIR's) is 'retrieval'.
QUERY_EVALUATORS = {"mmeb": "mmeb", "covr": "covr"}
# Why an evaluation of the embedded world has no counterpart on an imported dataset, by type.
WORLD_ONLY = {
    "mm2mm": "it needs MM2MM triplets (queries with hard negatives), which an import lacks",
    "solar_masks": "it needs ground-truth masks (caption tags and image labels), which an import "
    "lacks",
}
# What an evaluation of the world needs of a dataset to follow the recipe there, by type.
NEEDED_SPLITS = {
    "caption5": "CAPTION5 split (an image and its captions per record)",
    **{
        kind: "query/candidate splits (<name>_queries and <name>_candidates)"
        for kind in ("retrieval", "mmeb", "covr")
    },
}
CAPTION5_ORDER = ("test", "val")  # the split a recipe's one caption5 evaluation prefers


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """A dataset directory made by ``python -m mmret.prepare``, as a recipe trains on it.

  Attributes:
    path: the absolute dataset directory (what configs name as ``dataset``).
    train_split: the PAIRS split training reads.
    kinds: split -> PAIRS | CAPTION5 | QUERIES | CANDIDATES, or None (another schema).
    format: the format it was imported from ('' when unknown).
  """

  path: str
  train_split: str
  kinds: dict
  format: str = ""

  def splits(self, kind: str) -> list:
    return sorted(s for s, k in self.kinds.items() if k == kind)

  @property
  def caption5_splits(self) -> list:
    """CAPTION5 splits, the preferred one (``test``, else ``val``, else a-z) first."""
    rank = {name: i for i, name in enumerate(CAPTION5_ORDER)}
    return sorted(self.splits(CAPTION5), key=lambda s: (rank.get(s, len(rank)), s))

  @property
  def query_splits(self) -> list:
    """Names of the query/candidate split pairs (``<name>_queries`` + ``<name>_candidates``)."""
    candidates = set(self.splits(CANDIDATES))
    return [
        s[: -len("_queries")]
        for s in self.splits(QUERIES)
        if s[: -len("_queries")] + "_candidates" in candidates
    ]


def _split_kind(split: str, fields) -> str | None:
  fields = set(fields)
  if split.endswith("_queries") and "positive_ids" in fields:
    return QUERIES
  if split.endswith("_candidates") and {"modality", "pool"} <= fields:
    return CANDIDATES
  if {"image", "caption"} <= fields:
    return PAIRS
  if {"image", "captions"} <= fields:
    return CAPTION5
  return None


def _is_prepared(path: str) -> bool:
  return bool(path) and (epath.Path(path) / "dataset_info.json").exists()


def resolve_data(data: str, split: str = "") -> PreparedData:
  """The prepared dataset ``data`` names, with its training split.

  ``data`` is a dataset directory made by ``python -m mmret.prepare`` (a local path, made
  absolute, or a URL such as ``gs://bucket/mmret/coco``) or ``DIR/SPLIT``. The
  training split is ``split`` (else the ``SPLIT`` of ``data``), which must be a PAIRS split (one
  image and caption per record); otherwise the dataset's only PAIRS split, or ``train`` among
  several. Errors name the directory and list its splits with their kinds.
  """
  path = data.rstrip("/") if "://" in data else os.path.abspath(os.path.expanduser(data))
  if not _is_prepared(path):
    parent, _, tail = path.rpartition("/")
    if _is_prepared(parent) and not epath.Path(path).is_dir():
      if split and split != tail:
        raise ValueError(f"data={data!r} names split {tail!r} and split={split!r}: give one")
      path, split = parent, tail
    else:
      what = "holds no prepared dataset (no dataset_info.json)"
      raise FileNotFoundError(
          f"data={data!r}: {path} "
          f"{what if epath.Path(path).is_dir() else 'does not exist'}; make a dataset with "
          f"python -m mmret.prepare --format=FORMAT --src=SOURCE --out={path}"
      )
  builder = sources.load_builder(path)
  metadata = dict(builder.info.metadata or {})
  split_fields = metadata.get("split_fields") or {}
  features = list(builder.info.features.keys())
  kinds = {s: _split_kind(s, split_fields.get(s) or features) for s in builder.info.splits.keys()}
  summary_file = epath.Path(path) / "import_summary.json"
  summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
  listing = ", ".join(f"{s} ({k or 'other'})" for s, k in sorted(kinds.items()))
  pairs = sorted(s for s, k in kinds.items() if k == PAIRS)
  if split:
    if split not in kinds:
      raise ValueError(f"dataset {path} has no split {split!r}; its splits: {listing}")
    if kinds[split] != PAIRS:
      raise ValueError(
          f"dataset {path}: split {split!r} is not a training split (a PAIRS split: one image and "
          f"caption per record); its splits: {listing}"
      )
  elif not pairs:
    raise ValueError(
        f"dataset {path} has no training split (a PAIRS split: one image and caption per record; "
        f"the coco, karpathy and lcs558k imports write one); its splits: {listing}"
    )
  elif len(pairs) == 1 or "train" in pairs:
    split = pairs[0] if len(pairs) == 1 else "train"
  else:
    raise ValueError(
        f"dataset {path} has several training splits {pairs}: choose one with "
        f"data={path}/SPLIT or the argument split=SPLIT"
    )
  return PreparedData(path, split, kinds, str(summary.get("format", "")))


def _log_skipped(data: PreparedData, where: str, cfg, reason: str):
  logging.warning(
      "data=%s: skipping evaluation %s (%s on %s split %r): %s",
      data.path,
      where,
      cfg.get("type"),
      cfg.get("dataset"),
      cfg.get("split"),
      reason,
  )


def fit_evals(config, data: PreparedData, *, evals: bool = True) -> None:
  """Fits the evaluations of ``config`` (and of its stages) to the prepared dataset ``data``.

  Evaluations of the embedded world go, each with a warning naming it and why: those needing its
  ground truth (MM2MM triplets, masks from caption tags and image labels) and its own splits
  (``universal``, ``caption5``). A ``modality_gap`` on the world's training split moves to
  ``data``'s. With ``evals``, ``data``'s evaluation splits then get their evaluator, ``every=0``
  unless the recipe's evaluation of the same type it replaces says otherwise (its options kept):
  ``caption5`` on each CAPTION5 split (the preferred one named ``caption5``, others
  ``caption5_<split>``) and ``retrieval`` (``mmeb``, ``covr``) on each query/candidate pair, in
  the recipe's evaluation group (``config.evals``, or its last stage's when only stages have them).
  """
  groups = {"evals": config.evals}
  for name, stage in (config.get("stages") or {}).items():
    if "evals" in stage:
      groups[f"stages.{name}.evals"] = stage.evals
  templates = {}  # evaluator type -> (group, name, fields) of the world evaluation it replaces
  removed = []  # (where, fields) of the world evaluations taken out
  for where, group in groups.items():
    for name in list(group.keys()):
      cfg = group[name]
      if not str(cfg.get("dataset", "")).startswith(WORLD_PREFIX):
        continue
      if cfg.get("type") == "modality_gap" and cfg.get("split") == "train":
        cfg.dataset, cfg.split = data.path, data.train_split
        continue
      fields = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
      del group[name]
      templates.setdefault(fields.get("type"), (group, name, fields))
      removed.append((f"{where}.{name}", fields))

  added = []  # (evaluator type, split)
  if evals:
    query_type = QUERY_EVALUATORS.get(data.format, "retrieval")
    stages = list(config.get("stages") or {})
    default_group = config.evals
    if stages and not config.evals and not any(f[0].startswith("evals.") for f in removed):
      last = config.stages[stages[-1]]
      if "evals" not in last:
        last.evals = ml_collections.ConfigDict()
      default_group = last.evals
    for kind, splits in (("caption5", data.caption5_splits), (query_type, data.query_splits)):
      group, name, fields = templates.get(
          kind, (default_group, kind, {"every": 0, "batch_size": 64})
      )
      for i, split in enumerate(splits):
        entry = {**fields, "type": kind, "dataset": data.path, "split": split}
        group[name if i == 0 else f"{name}_{split}"] = entry
        added.append((kind, split))
        if kind == "caption5" and split == f"{data.train_split}_caption5":
          logging.warning(
              "data=%s: caption5 split %r holds the training split's images (a score on seen "
              "data); import held-out images (e.g. Karpathy's val/test) for a held-out score",
              data.path,
              split,
          )
  for where, fields in removed:
    kind = fields.get("type")
    replacements = [
        f"{k} on {s!r}" for k, s in added if NEEDED_SPLITS.get(k, k) == NEEDED_SPLITS.get(kind)
    ]
    if kind in WORLD_ONLY:
      reason = WORLD_ONLY[kind]
    elif replacements:
      reason = f"the dataset's own evaluations replace it: {', '.join(replacements)}"
    else:
      reason = (
          f"it reads the embedded world's {fields.get('split')!r} split and the dataset has no "
          f"{NEEDED_SPLITS.get(kind, 'counterpart of it')}"
      )
    _log_skipped(data, where, fields, reason)


def use_data(config, data: str, split: str = "", *, evals: bool = True) -> PreparedData | None:
  """Points ``config`` at the prepared dataset ``data`` (the recipes' ``data`` / ``split``).

  Every stage trains on its training split (:func:`resolve_data`), tokenised with the vocabulary
  stored in its metadata unless the config names another tokenizer (e.g. shipped towers' own),
  and the evaluations follow it (:func:`fit_evals`). Empty ``data``: the config is left as it is.
  """
  if not data:
    if split:
      raise ValueError(f"split={split!r} chooses a split of data=DIR, but no data is given")
    return None
  prepared = resolve_data(data, split)
  config.input.train = [{"dataset": prepared.path, "split": prepared.train_split, "weight": 1.0}]
  fit_evals(config, prepared, evals=evals)
  return prepared
