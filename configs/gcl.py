"""GCL: fine-tuning a pretrained dual encoder with Generalized Contrastive Learning.

  python -m mmret.main --config=configs/gcl.py --workdir=/tmp/gcl
  python -m mmret.main --config=configs/gcl.py:loss=cl --workdir=/tmp/gcl_cl
  python -m mmret.main --config=configs/gcl.py:fusion=encoder,steps=400 --workdir=/tmp/gcl_enc

Two stages (``config.stages``), each in ``workdir/<stage>``; their names start with their number
because a ConfigDict keeps its keys sorted, and stages run in that order:
- ``1_pretrain``: the CLIP loss (image <-> text InfoNCE) for ``pretrain_steps`` steps; it stands in
  for the pretrained dual encoder GCL starts from, and its final evaluation is the "before".
- ``2_finetune``: ``steps`` more steps with the chosen ``loss`` at a lower learning rate:
  ``gcl`` (3N-way softmax over image, text and image+text, mmret/losses/gcl.py), ``cl`` (image <->
  text InfoNCE only) or ``pairwise`` (the six InfoNCE terms between the three modalities).

Both stages train on image-caption pairs: the embedded world's train split by default. To train
on LCS-558K, import it and pass its directory as ``data`` (both stages then read its ``train``
split, tokenised with the word vocabulary the import stored from its captions)::

  python -m mmret.prepare --format=lcs558k --src=/data/LLaVA-Pretrain --out=/data/mmret/lcs558k
  python -m mmret.main --config=configs/gcl.py:data=/data/mmret/lcs558k --workdir=/tmp/gcl_lcs

With ``data``, the world's evaluations below give way to the dataset's (``config_lib.fit_evals``):
``universal`` and ``gap_universal`` are skipped (a warning names each; query/candidate splits of
the dataset get ``retrieval`` instead), ``gap_train`` reads its training split, and ``caption5``
runs on each of its CAPTION5 splits.

Evaluations (at the end of each stage; ``every=0``):
- ``universal``: the ``retrieval`` evaluator on the world's ``universal`` split, whose nine tasks
  are every query/candidate modality combination (qt_ci, qi_ct, qt_ct, qi_ci, qt_cit, qi_cit,
  qit_ct, qit_ci, qit_cit); Recall@5 per task in its local pool and in the global pool, and
  their averages ``local/average`` and ``global/average``.
- ``gap_universal`` / ``gap_train``: the ``modality_gap`` evaluator (``mmret/evals/modality_gap.py``)
  on the universal candidates and on the train split's pairs: cosine similarity and distance
  between the centroids of the image, text and image+text embeddings.

Arguments (defaults in brackets):
  size [tiny]            model size (tiny | small | base)
  world [tiny]           embedded world (tiny | small | base | fashion_*)
  loss [gcl]             fine-tuning loss: gcl | cl | pairwise
  fusion [fusion]        image+text embedding: 'fusion' = normalise(z_image + z_text) (score
                         fusion, UniIR's CLIP-SF) | 'encoder' = the joint transformer's CLS
  steps [300]            fine-tuning steps
  pretrain_steps [600]   CLIP pretraining steps
  lr [3e-4]              fine-tuning peak learning rate, warmed up over a tenth of the steps (at
                         most 20) then cosine-decayed; pretraining uses the base config's
  temperature [0.0]      fixed fine-tuning softmax temperature; 0 = the model's learnable one,
                         carried over from pretraining
  drop_other_positive [false]  gcl only: also drop the anchor's third same-sample modality from
                         each denominator (false = the paper's literal loss)
  evals [true]           false: no evaluations (training only)
  towers [scratch]       'shipped': start both stages' towers from the real EfficientNet-Lite0
                         and all-MiniLM-L6-v2 weights pip packages ship (128 px, MiniLM's
                         vocabulary; pair it with a real-image world, e.g. world=fashion_tiny)
  data ['']              a dataset directory made by ``python -m mmret.prepare`` (or DIR/SPLIT)
                         to train on instead of the world (see ``config_lib.use_data``)
  split ['']             data's training split, when it has several PAIRS splits
"""

import ml_collections

from mmret import config_lib

LOSSES = ("gcl", "cl", "pairwise")
FUSIONS = ("fusion", "encoder")
PRETRAIN, FINETUNE = "1_pretrain", "2_finetune"  # stage names (and directories)


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg,
      size="tiny",
      world="tiny",
      loss="gcl",
      fusion="fusion",
      steps=300,
      pretrain_steps=600,
      lr=3e-4,
      temperature=0.0,
      drop_other_positive=False,
      evals=True,
      towers="scratch",
      **config_lib.DATA_ARGS,
  )
  config_lib.check_choice("gcl", "towers", arg.towers, config_lib.TOWERS)
  config_lib.check_choice("gcl", "loss", arg.loss, LOSSES)
  config_lib.check_choice("gcl", "fusion", arg.fusion, FUSIONS)
  if arg.towers == "shipped":
    arg.size = config_lib.SHIPPED_SIZE
  if arg.drop_other_positive and arg.loss != "gcl":
    raise ValueError(f"gcl config: drop_other_positive applies to loss=gcl only, not {arg.loss!r}")
  if arg.steps < 1 or arg.pretrain_steps < 1:
    raise ValueError(
        f"gcl config: steps ({arg.steps}) and pretrain_steps "
        f"({arg.pretrain_steps}) must be positive"
    )

  # The dual-encoder recipe; its numbers are the pretraining stage's.
  config = config_lib.base_config(size=arg.size, world=arg.world, steps=arg.pretrain_steps)
  config_lib.contrastive_loss_impl(config.loss)
  config.model.joint_kind = arg.fusion
  if arg.towers == "shipped":
    config_lib.use_shipped_towers(config)
  config.eval_every = 0  # evaluate at the end of each stage (its final state)

  finetune_loss = {"name": arg.loss}
  if arg.temperature > 0:
    finetune_loss["temperature"] = arg.temperature
  if arg.loss == "gcl":
    finetune_loss["drop_other_positive"] = arg.drop_other_positive
  config.stages = ml_collections.ConfigDict(
      {
          PRETRAIN: {"total_steps": arg.pretrain_steps, "loss": {"name": "clip"}},
          # Fine-tuning warms up over a tenth of its steps (at most 20).
          FINETUNE: {
              "total_steps": arg.steps,
              "loss": finetune_loss,
              "optim": {"lr": arg.lr, "warmup_steps": min(20, arg.steps // 10)},
          },
      }
  )

  if arg.evals:
    world = f"mmret_world/{arg.world}"
    config.evals.universal = dict(
        type="retrieval",
        dataset=world,
        split="universal",
        every=0,
        pools=("local", "global"),
        recall_k=5,
        batch_size=64,
    )
    config.evals.gap_universal = dict(
        type="modality_gap", dataset=world, split="universal_candidates", every=0, batch_size=64
    )
    config.evals.gap_train = dict(
        type="modality_gap", dataset=world, split="train", every=0, max_records=512, batch_size=64
    )
  config_lib.use_data(config, arg.data, arg.split, evals=arg.evals)
  return config
