"""What recipe configs (``configs/*.py``) build on: the base config and argument parsing.

Every recipe starts from :func:`base_config` (Flax's ``default.py`` pattern) and overrides what
it needs; config files import only ``mmret``, so ``--config=/abs/path/configs/solar.py`` works from
any working directory. Common knobs every recipe has: seed, total_steps, input.batch_size
(global), log_every, eval_every, ckpt_every, model.size.
"""

import ml_collections

from mmret.data import pipeline
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
  config.mapping = "pmap"  # 'pmap' | 'shard_map'

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
