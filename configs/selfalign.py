"""SelfAlign (arXiv 2308.14009): VSE++ plus concept- and context-level alignment of local features.

  python -m mmret.main --config=configs/selfalign.py --workdir=/tmp/selfalign
  python -m mmret.main --config=configs/selfalign.py:variant=base,steps=300 --workdir=/tmp/vsepp

Arguments: size (model: tiny | small | base), world (embedded world: tiny | small | base),
variant (base | concept | context | both), steps (total training steps), sum_warmup (the first
steps, trained with VSE++'s sum over negatives before the hardest-negative stage; 0 = none).

Variants (the paper's ablation rows):
  base     VSE++ only (hinge on the hardest negative), scored by global.global.
  concept  + concept-level alignment (prototypes), scored by global.global.
  context  + context-level alignment, scored by SelfAlign's final similarity.
  both     + both losses, scored by the final similarity (the full method).
The final similarity g_i.g_t + 0.5 (ctx_i.mean_t + mean_i.ctx_t) compares one modality's pooled
locals with the other's, a comparison of global-like vectors with locals that only the context loss
trains (under VSE++ alone the local adapters get no gradient at all), so the variants without it
are scored on the globals alone; set ``config.method.similarity`` to override.

Numbers (defaults; the paper's value in brackets where it differs):
  loss.margin 0.2, loss.max_violation True (False = sum over negatives, the VSE0 variant).
  sum_warmup 100 steps: stage ``1_sum_warmup`` (max_violation False), then stage ``2_hardest``
    (True, the rest of ``steps``, lr x0.2 after 10 warmup steps), each in ``workdir/<stage>``.
  loss.concept_weight / context_weight 1.0 when on.
  model.num_prototypes (K): 64 at size=tiny [1024]. A tiny batch holds 64 x 16 = 1,024 regions,
    and Sinkhorn's equal-mass constraint over 1,024 prototypes would give each about one region.
  loss.epsilon 0.05 and loss.sinkhorn_iterations 2 (as in the public code); concept_temperature 0.1.
  loss.context_temperature 0.7; loss.num_negatives (hardest k) 512.
  method.pooling_temperature 0.1 (attention pooling of the context vectors).
  optim: AdamW lr 1e-3 (tiny) / 5e-4, 50 warmup steps, cosine; batch 64; 600 steps.

Evaluation: the 5-caption protocol (``caption5`` evaluator) on the world's ``caption5`` split.

Karpathy-format Flickr30K / COCO: import it, then pass its directory as ``data``: training reads its
``train`` split, tokenised with the word vocabulary the import stored from its captions, and the
``caption5`` evaluation its ``test`` split (5 captions per image, i2t and t2i R@1/5/10 and R@sum;
``caption5_val`` the ``val`` split); ``fold_size=1000`` adds COCO-1K's mean over 1,000-image folds
as ``folds/...`` (the unprefixed metrics are then COCO-5K)::

  python -m mmret.prepare --format=karpathy --src=/data/flickr30k/flickr30k-images \
      --annotations=/data/flickr30k/dataset_flickr30k.json --out=/data/mmret/flickr30k
  python -m mmret.main --config=configs/selfalign.py:size=small,data=/data/mmret/flickr30k \
      --workdir=/tmp/sa_f30k

Other arguments: data (a dataset directory made by ``python -m mmret.prepare``, or ``DIR/SPLIT``;
empty = the embedded world; ``config_lib.use_data``), split (data's training split when it has
several PAIRS splits), fold_size (caption5 fold size; 0 = none), towers (scratch | shipped: frozen
ImageNet EfficientNet-Lite0 + all-MiniLM-L6-v2 from pip packages, 128 px, MiniLM's vocabulary;
pair with world=fashion_*). The training loss reads image-caption pairs only.
"""

import ml_collections

from mmret import config_lib

VARIANTS = {  # variant -> (concept loss on, context loss on)
    "base": (False, False),
    "concept": (True, False),
    "context": (False, True),
    "both": (True, True),
}


SUM_STAGE, HARDEST_STAGE = "1_sum_warmup", "2_hardest"
# The hardest-negative stage: its learning rate relative to the first stage's (at the full rate the
# embeddings still collapsed after the switch), and its warmup (its optimizer state starts afresh).
HARDEST_STAGE_LR_FACTOR = 0.2
HARDEST_STAGE_LR_WARMUP = 10


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg,
      size="tiny",
      world="tiny",
      variant="both",
      steps=600,
      sum_warmup=100,
      fold_size=0,
      towers="scratch",
      **config_lib.DATA_ARGS,
  )
  config_lib.check_choice("selfalign", "variant", arg.variant, sorted(VARIANTS))
  config_lib.check_choice("selfalign", "towers", arg.towers, config_lib.TOWERS)
  if arg.towers == "shipped":
    arg.size = config_lib.SHIPPED_SIZE
  if not 0 <= arg.sum_warmup < arg.steps:
    raise ValueError(f"sum_warmup={arg.sum_warmup} must be in [0, steps={arg.steps})")
  concept, context = VARIANTS[arg.variant]
  tiny = arg.size == "tiny"

  config = config_lib.base_config(size=arg.size, world=arg.world, steps=arg.steps)
  config.eval_every = 0  # caption5 runs at the end of training only
  config.ckpt_every = 0
  config.keep_ckpts = 1

  config.model.joint_kind = "fusion"  # independent towers: nothing joint at retrieval time
  config.model.unimodal = "tower"
  config.model.num_prototypes = (64 if tiny else 1024) if concept else 0
  if arg.towers == "shipped":
    config_lib.use_shipped_towers(config)

  config.method = ml_collections.ConfigDict(
      dict(
          name="selfalign",
          similarity="final" if context else "global",
          pooling_temperature=0.1,
      )
  )
  # The selfalign method trains with its own loss (VSE++ + concept + context).
  config.loss = ml_collections.ConfigDict(
      dict(
          margin=0.2,
          max_violation=True,
          concept_weight=1.0 if concept else 0.0,
          context_weight=1.0 if context else 0.0,
          epsilon=0.05,
          sinkhorn_iterations=2,
          concept_temperature=0.1,
          context_temperature=0.7,
          num_negatives=512,
      )
  )
  config.evals.caption5 = dict(
      type="caption5",
      dataset=f"mmret_world/{arg.world}",
      split="caption5",
      every=0,
      batch_size=100,
  )
  if arg.fold_size:
    config.evals.caption5.fold_size = arg.fold_size
  if arg.sum_warmup:
    # VSE++'s hardest negative collapses every embedding to one point when trained from scratch
    # (the hinge then sits at the margin); as VSE-infinity does, the first steps use the sum over
    # negatives, then a second stage continues from those weights with the hardest negative.
    # Stage names start with their number: a ConfigDict keeps keys sorted and stages run in order.
    config.stages = ml_collections.ConfigDict(
        {
            SUM_STAGE: {"total_steps": arg.sum_warmup, "loss": {"max_violation": False}},
            HARDEST_STAGE: {
                "total_steps": arg.steps - arg.sum_warmup,
                "optim": {
                    "lr": config.optim.lr * HARDEST_STAGE_LR_FACTOR,
                    "warmup_steps": HARDEST_STAGE_LR_WARMUP,
                },
            },
        }
    )
  config_lib.use_data(config, arg.data, arg.split)
  return config
