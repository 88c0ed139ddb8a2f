"""Process set-up shared by the entry points: multi-host JAX initialisation and logging.

Multi-host: pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or ``--distributed=auto`` to let JAX
detect the cluster (TPU pods, SLURM). On CPU, collectives across processes use gloo.
"""

import os

from absl import app, flags, logging

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "off",
    ["off", "auto"],
    "'auto': jax.distributed.initialize() detects the cluster.",
)
_PLATFORM = flags.DEFINE_string("platform", None, "Force a JAX platform (cpu, gpu, tpu).")


def _distributed_args():
  """Coordinator settings from flags, else from the JAX_* environment; None when single-process."""
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  count = _NUM_PROCESSES.value or os.environ.get("JAX_NUM_PROCESSES")
  index = _PROCESS_ID.value if _PROCESS_ID.value is not None else os.environ.get("JAX_PROCESS_ID")
  given = [v is not None for v in (address, count, index)]
  if any(given) and not all(given):
    raise app.UsageError(
        "multi-host needs all of --coordinator_address, --num_processes and "
        "--process_id (or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
        "JAX_PROCESS_ID)"
    )
  return (address, int(count), int(index)) if all(given) else None


class _QuietLibraries:
  """Drops INFO chatter of Orbax, Grain and tfds (they log every checkpoint file operation)."""

  NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record):
    return record.levelno > 20 or not any(part in record.pathname for part in self.NOISY)


def initialize_jax():
  """Selects the platform and joins the multi-host job when one is configured."""
  import jax  # imported after flags so that --platform can take effect

  if _PLATFORM.value:
    jax.config.update("jax_platforms", _PLATFORM.value)
  args = _distributed_args()
  if args is not None or _DISTRIBUTED.value == "auto":
    if (_PLATFORM.value or os.environ.get("JAX_PLATFORMS", "")).startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args is not None:
      address, count, index = args
      jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    else:
      jax.distributed.initialize()
  logging.info(
      "JAX process %d/%d, %d local / %d global devices (%s)",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].platform,
  )


def setup_logging():
  """absl logging without the libraries' per-file INFO lines."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
