"""CLIP-style contrastive training (image <-> text InfoNCE) on the embedded world.

  python -m mmret.main --config=configs/clip.py --workdir=/tmp/run
  python -m mmret.main --config=configs/clip.py:size=small,world=small --workdir=/tmp/run_small
  python -m mmret.main --config=configs/clip.py:data=/data/mmret/coco --workdir=/tmp/run_coco

Arguments: size (tiny | small | base), world (embedded world size: tiny | small | base),
steps (total training steps), evals (false: train only), data (a dataset directory made by
``python -m mmret.prepare``, or ``DIR/SPLIT``: train on it instead of the world, tokenised with the
word vocabulary the import stored; the world's evaluations give way to the dataset's own, e.g.
``caption5`` on its CAPTION5 split; see ``config_lib.use_data``), split (data's training split
when it has several PAIRS splits).
"""

from mmret import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, size="tiny", world="tiny", steps=600, evals=True, **config_lib.DATA_ARGS
  )
  config = config_lib.base_config(size=arg.size, world=arg.world, steps=arg.steps)
  config_lib.contrastive_loss_impl(config.loss)
  if arg.evals:
    world = f"mmret_world/{arg.world}"
    # Image <-> text with 5 captions per image, and the mixed-modality (M-BEIR-style) tasks.
    config.evals.caption5 = dict(type="caption5", dataset=world, split="caption5", batch_size=64)
    config.evals.universal = dict(type="retrieval", dataset=world, split="universal", batch_size=64)
  config_lib.use_data(config, arg.data, arg.split, evals=arg.evals)
  return config
