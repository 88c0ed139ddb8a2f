"""Entry point: ``python -m mmret.main --config=configs/clip.py --workdir=DIR``.

Parses flags, initialises multi-host JAX when asked (see ``mmret.runtime``), and hands off to
``mmret.train.run``. Each process feeds its own part of the global batch.

Exit status: 0 when training finished or was stopped by SIGTERM (a preemption) after saving a
checkpoint, 130 when stopped by SIGINT after saving, 1 for a config value no run can use or a
workdir in use by another run (with a message naming the field / the holder).
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmret import faults, runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory, a local path or a URL such as gs://bucket/run (default: runs/<recipe name>).",
)


def default_workdir(config_path: str) -> str:
  recipe = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", recipe)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup_logging()
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or default_workdir(config_path)
  try:
    # Before the slow start-up; train.run takes the lock itself.
    faults.WorkdirLock(workdir).check_free()
  except faults.WorkdirLockedError as e:
    sys.exit(f"error: {e}")
  runtime.initialize_jax()
  from mmret import train  # after JAX initialisation

  try:
    train.run(_CONFIG.value, workdir)
  except faults.Stopped as stopped:
    logging.warning("%s; relaunch the same command to resume", stopped)
    sys.exit(stopped.exit_code)
  except (faults.ConfigError, faults.WorkdirLockedError) as e:
    sys.exit(f"error: {e}")


def parse_flags(argv):
  """absl's flag parsing, with config errors (a mistyped field, a value of the wrong type, a bad
  config argument) turned into one line naming the field instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpfull to list the flags.")
  except Exception as e:  # raised while loading the config file or applying an override
    sys.exit(f"error: {_config_error(e, argv)}")


def _config_error(error, argv) -> str:
  """What is wrong with the --config flags, naming the field and what it accepts."""
  if isinstance(error, (AttributeError, KeyError)):
    text = str(error.args[0]) if error.args else str(error)
    name = re.search(r"\w+", text)
    name = name.group(0) if name else text
    hint = text.split("\n", 1)[1] if "\n" in text else ""
    for arg in argv:
      field = arg.split("=", 1)[0]
      if field.startswith("--config.") and field.rsplit(".", 1)[-1] == name:
        parent = field[len("--") :].rsplit(".", 1)[0]
        known = _fields_at(argv, parent)
        return f"{field[2:]} is not a config field; {parent} has {known}. {hint}".strip()
    return f"unknown config field {name!r}. {hint}".strip()
  return f"{type(error).__name__}: {error}"


def _fields_at(argv, parent: str):
  """The field names of ``parent`` (e.g. 'config.model') in the config file alone."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    return "?"
  try:
    from ml_collections.config_flags import config_flags as impl

    path, _, arg = config_arg.partition(":")
    module = impl._LoadConfigModule(f"{os.path.basename(path)}_fields", path)  # noqa: SLF001
    node = module.get_config(arg) if arg else module.get_config()
    for part in parent.split(".")[1:]:
      node = node[part]
    return sorted(node.keys())
  except Exception:  # the listing is a courtesy; the error itself is already clear
    return "?"


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
