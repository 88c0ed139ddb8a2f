"""SOLAR (arXiv 2605.15868): stage 1 learns intersection masks, stage 2 trains the
multimodal-to-multimodal joint embedding on views built from them, then MM2MM is evaluated.

  python -m mmret.main --config=configs/solar.py --workdir=/tmp/solar
  python -m mmret.main --config=configs/solar.py:random_masks=true --workdir=/tmp/solar_random

One launch runs ``stage1`` in ``workdir/stage1``, then ``stage2`` in ``workdir/stage2`` from stage
1's parameters; a relaunch resumes inside the unfinished stage. Arguments: size (tiny | small |
base), world (embedded world size), stage1_steps, stage2_steps, batch_size, random_masks (the
ablation: random masks of the learned masks' density in both stages, ``method.mask_source``
'random'), evals (false: train only),
stage1_mm2mm (also evaluate MM2MM at the end of stage 1), towers ('scratch', or 'shipped': start
from the real EfficientNet-Lite0 and all-MiniLM-L6-v2 weights pip packages ship, at 128 px, with
MiniLM's vocabulary; use it with a real-image world, e.g.
``configs/solar.py:towers=shipped,world=fashion_tiny``; see ``common.use_shipped_towers``),
oracle_masks (a diagnostic: stage 2 builds its views from the embedded world's ground-truth
intersection labels instead of stage 1's masks, ``method.mask_source`` 'oracle'), threshold
('pairs': the paper's density crossing of positive- and negative-pair scores; 'mixture': the
intersection component fitted inside the positive pairs, ``masks.fit_mixture_threshold``; both
stages and the mask evaluator), score (the token score masks threshold: 'cosine', the paper's
cosine to the partner's global, or 'contrast', that cosine less the unit's mean cosine to the
other samples' partners, ``masks.token_score_samples``), gla_weight (stage 1's GLA loss weight;
README's ladder measures its gradient against the masked ITC's), gla ('mean', the paper's hinge
on the caption's mean cosine to the partner, or 'token': every token and patch contrasted against
the partners on its own, ``losses.token_to_global_infonce``, README's ladder rung 10),
anneal_start (stage-1 step before which the masked ITC sees every unit, rho = 1; the masks then
anneal in over half of the remaining steps), negatives (stage 2's hard negatives drop 'ratio', i.e.
``method.negative_ratio`` of the difference units, or one 'fact': one phrase of the caption, one
image segment; per modality in ``method.{text,image}_negative``), segments ('kmeans' or the
paper's hierarchical 'agglomerative' grouping of patches), eval_split ('mm2mm', the reported set,
or 'mm2mm_val', the held-out set settings are chosen on), tower_depth (transformer blocks of each
from-scratch tower; -1, the default, keeps the size's: 2 at tiny; 0 makes every token and patch
feature local, see README's diagnosis ladder), data (a dataset directory made by ``python -m
mmret.prepare``, or ``DIR/SPLIT``, to train both stages on instead of the world, tokenised with the
word vocabulary the import stored; ``config_lib.use_data``) and split (data's training split when
it has several PAIRS splits).

Training reads image-caption pairs only (the world's ground-truth tags and labels feed the
evaluators and, logged as metrics, stage 1's mask quality), so ``data`` works as the world does;
only ``oracle_masks`` needs the world. With ``data``, ``masks`` and ``mm2mm`` (which need the
world's ground truth: intersection labels, MM2MM triplets) are skipped with a warning naming each,
and stage 2 ends with ``caption5`` on each of the dataset's CAPTION5 splits instead::

  python -m mmret.main --config=configs/solar.py:data=/data/mmret/coco --workdir=/tmp/solar_coco

Model: the towers -> 2-layer MLP adapters into the shared width -> a 3-layer joint encoder over
[CLS; image tokens; text tokens] with per-token attention weights; z_image / z_text come from the
same joint encoder fed one modality. Towers train unless ``optim.freeze`` matches them (e.g.
``--config.optim.freeze='^(image|text)_tower/'`` when starting from pretrained towers via
``model.init``). Evaluations: stage 1 ends with ``solar_masks`` (mask quality + PNG overlays in
``stage1/eval/masks/``); stage 2 ends with ``mm2mm`` (Recall@1/5/10, mR, Precision by negative kind,
Avg) on the world's ``mm2mm`` split.

Defaults chosen where the public record is silent (tiny size, CPU, a few minutes in all):
- batch_size 32 (the paper's), stage1_steps 150, stage2_steps 50 (paper: 2,000 / 200 at scale);
  the default launch took 6.7 minutes wall (3.2 min CPU) on a shared 2-core CPU.
- Stage 1 (``stages.stage1``): loss weights ``loss.itc_weight`` 1, ``gla_weight`` 1, ``ld_weight``
  0.1, ``gd_weight`` 0.1 (the teacher trained from scratch is only the initial towers, so
  distillation is a light regulariser); GLA margin 0.2; masked-ITC temperature: the model's
  learnable one (``loss.temperature`` None). Mask annealing ``method.anneal_steps`` = half of
  stage 1, ``anneal_schedule`` 'linear' (rho 1 -> 0, then hard masks for the second half).
  Ground-truth patch labels: intersection when >= 25% of the patch's pixels are intersection
  object pixels (``loss.patch_label_fraction``; a majority marks almost no patch at 32 px).
- Stage 2 (``stages.stage2``): masks come from a frozen copy of the model at the stage-2 start
  (stage 1's towers, adapters and joint encoder); thresholds refitted on each batch.
  ``method.num_segments`` 4 segments per image (k-means on adapted patch features + grid position,
  5 iterations, position weight 1; the paper clusters hierarchically) over the 4x4 patch grid;
  ``method.view_mode`` 'random' (per sample: text only, image only or both masked),
  ``method.mask_ratio`` 0.3 of the intersection units dropped for the positive,
  ``method.negative_ratio`` 1.0 of the difference units dropped for the hard negative;
  ``loss.temperature`` eta = 0.05; symmetric (positive views anchor too); lr 5e-4 with 10 warmup
  steps.
"""

import ml_collections

from mmret import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg,
      size="tiny",
      world="tiny",
      stage1_steps=150,
      stage2_steps=50,
      batch_size=32,
      random_masks=False,
      evals=True,
      stage1_mm2mm=False,
      towers="scratch",
      oracle_masks=False,
      threshold="pairs",
      score="cosine",
      gla_weight=1.0,
      gla="mean",
      anneal_start=0,
      negatives="ratio",
      segments="kmeans",
      eval_split="mm2mm",
      tower_depth=-1,
      **config_lib.DATA_ARGS,
  )
  if arg.data and arg.oracle_masks:
    raise ValueError(
        "solar config: oracle_masks reads the embedded world's ground-truth intersection labels, "
        f"which data={arg.data!r} lacks"
    )
  if not 0 <= arg.anneal_start < arg.stage1_steps:
    raise ValueError(
        f"solar config: anneal_start={arg.anneal_start} must be in [0, stage1_steps="
        f"{arg.stage1_steps})"
    )
  if arg.random_masks and arg.oracle_masks:
    raise ValueError("solar config: random_masks and oracle_masks exclude each other")
  config_lib.check_choice("solar", "towers", arg.towers, config_lib.TOWERS)
  config_lib.check_choice("solar", "threshold", arg.threshold, ("pairs", "mixture"))
  config_lib.check_choice("solar", "score", arg.score, ("cosine", "contrast"))
  config_lib.check_choice("solar", "gla", arg.gla, ("mean", "token"))
  config_lib.check_choice("solar", "negatives", arg.negatives, ("ratio", "fact"))
  config_lib.check_choice("solar", "segments", arg.segments, ("kmeans", "agglomerative"))
  config_lib.check_choice("solar", "eval_split", arg.eval_split, ("mm2mm", "mm2mm_val"))
  if arg.towers == "shipped":
    arg.size = config_lib.SHIPPED_SIZE
  config = config_lib.base_config(size=arg.size, world=arg.world, steps=arg.stage1_steps)
  config.eval_every = 0  # evaluations run at the end of their stage
  config.ckpt_every = 100
  world = f"mmret_world/{arg.world}"
  config.input.batch_size = arg.batch_size

  config.model.adapter = "mlp"
  config.model.joint_kind = "encoder"
  config.model.unimodal = "joint"
  config.model.joint.depth = 3
  if arg.towers == "shipped":
    config_lib.use_shipped_towers(config)
  elif arg.tower_depth >= 0:  # transformer blocks in each from-scratch tower (-1: the size's)
    config.model.image.depth = config.model.text.depth = arg.tower_depth
  # Each stage names its method (which brings its own loss) and adds the hyper-parameters.
  config.method = ml_collections.ConfigDict({"name": "solar_stage1"})
  config.loss = ml_collections.ConfigDict()

  stage1_source = "random" if arg.random_masks else "learned"
  stage2_source = "oracle" if arg.oracle_masks else stage1_source
  stage1 = dict(
      total_steps=arg.stage1_steps,
      method=dict(
          name="solar_stage1",
          anneal_steps=(arg.stage1_steps - arg.anneal_start) // 2,
          anneal_schedule="linear",
          anneal_start=arg.anneal_start,
          mask_source=stage1_source,
          min_variance=1e-6,
          threshold=arg.threshold,
          score=arg.score,
      ),
      loss=dict(
          itc_weight=1.0,
          gla_weight=arg.gla_weight,
          ld_weight=0.1,
          gd_weight=0.1,
          gla_margin=0.2,
          gla_kind=arg.gla,
          gla_temperature=0.1,
          gd_include_self=False,
          temperature=None,
          patch_label_fraction=0.25,
      ),
      evals={},
  )
  stage2 = dict(
      total_steps=arg.stage2_steps,
      optim=dict(lr=5e-4 if arg.size == "tiny" else 2e-4, warmup_steps=10),
      method=dict(
          name="solar_stage2",
          num_segments=4,
          segment_iterations=5,
          segment_position_weight=1.0,
          mask_source=stage2_source,
          min_variance=1e-6,
          view_mode="random",
          mask_ratio=0.3,
          negative_ratio=1.0,
          text_negative=arg.negatives,
          image_negative=arg.negatives,
          threshold=arg.threshold,
          score=arg.score,
          segment_method=arg.segments,
          patch_label_fraction=0.25,
      ),
      loss=dict(temperature=0.05, symmetric=True, impl="dense", block_size=512),
      evals={},
  )
  mm2mm = dict(type="mm2mm", dataset=world, split=arg.eval_split, batch_size=64, every=0)
  if arg.evals:
    stage1["evals"]["masks"] = dict(
        type="solar_masks",
        dataset=world,
        split="val",
        every=0,
        num_examples=256,
        num_overlays=8,
        patch_label_fraction=0.25,
        threshold=arg.threshold,
        score=arg.score,
    )
    if arg.stage1_mm2mm:
      stage1["evals"]["mm2mm"] = mm2mm
    stage2["evals"]["mm2mm"] = mm2mm
  config.stages = ml_collections.ConfigDict({"stage1": stage1, "stage2": stage2})
  config_lib.use_data(config, arg.data, arg.split, evals=arg.evals)
  return config
