"""Entry point: ``python -m mmret.main --config=configs/clip.py --workdir=DIR``.

Parses flags, initialises multi-host JAX when asked (see ``mmret.runtime``), and hands off to
``mmret.train.run``. Each process feeds its own part of the global batch.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from mmret import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<recipe name>).")


def default_workdir(config_path: str) -> str:
  recipe = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", recipe)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup_logging()
  runtime.initialize_jax()
  from mmret import train  # after JAX initialisation

  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or default_workdir(config_path)
  train.run(_CONFIG.value, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
