"""CLIP-style contrastive training (image <-> text InfoNCE) on the embedded world.

  python -m mmret.main --config=configs/clip.py --workdir=/tmp/run
  python -m mmret.main --config=configs/clip.py:size=small,world=small --workdir=/tmp/run_small

Arguments: size (tiny | small | base), world (embedded world size: tiny | small | base),
steps (total training steps), evals (false: train only).
"""

import ml_collections

from configs import common
from mmret.data import pipeline


def get_config(arg=None):
  arg = common.parse_arg(arg, size="tiny", world="tiny", steps=600, evals=True)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = arg.steps
  config.log_every = 50
  config.eval_every = 200
  config.ckpt_every = 200
  config.keep_ckpts = 2
  config.mapping = "pmap"  # 'pmap' | 'shard_map'

  config.input = pipeline.default_input_config()
  config.input.train = [{"dataset": f"mmret_world/{arg.world}", "split": "train", "weight": 1.0}]
  config.input.batch_size = 64
  if arg.size != "tiny":
    config.input.image_size = 64

  config.model = common.model_config(arg.size)
  config.optim = common.optim_config(lr=1e-3 if arg.size == "tiny" else 5e-4, warmup_steps=50)
  config.method = ml_collections.ConfigDict({"name": "contrastive"})
  config.loss = ml_collections.ConfigDict({"name": "clip"})
  config.evals = ml_collections.ConfigDict()
  if arg.evals:
    world = f"mmret_world/{arg.world}"
    # Image <-> text with 5 captions per image, and the mixed-modality (M-BEIR-style) tasks.
    config.evals.caption5 = dict(type="caption5", dataset=world, split="caption5", batch_size=64)
    config.evals.universal = dict(type="retrieval", dataset=world, split="universal", batch_size=64)
  return config
