"""Process set-up shared by the entry points: multi-host JAX initialisation and logging.

Multi-host: pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or ``--distributed=auto`` to let JAX
detect the cluster (TPU pods, SLURM). On CPU, collectives across processes use gloo.
"""

import collections
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
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    None,
    "Directory (local or gs://) of the persistent XLA compilation cache, which lets a relaunch, "
    "the next stage and evaluation reuse compiled steps. Default: $JAX_COMPILATION_CACHE_DIR, "
    "else ~/.cache/mmret/xla ($XDG_CACHE_HOME respected); 'off' disables it.",
)


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


_CACHE_EVENTS = collections.Counter()


def _count_cache_event(event: str, **kwargs) -> None:
  del kwargs
  if event.startswith("/jax/compilation_cache/cache_"):  # cache_hits, cache_misses
    _CACHE_EVENTS[event.rsplit("_", 1)[1]] += 1


def compilation_cache_events() -> dict:
  """Persistent compilation cache lookups counted so far: {'hits': n, 'misses': m}. Counting
  starts at the first call (take differences between two calls)."""
  if not _CACHE_EVENTS["listening"]:
    import jax  # noqa: PLC0415

    jax.monitoring.register_event_listener(_count_cache_event)
    _CACHE_EVENTS["listening"] = 1
  return {"hits": _CACHE_EVENTS["hits"], "misses": _CACHE_EVENTS["misses"]}


def default_compilation_cache() -> str:
  """Where compiled programs are kept between processes unless told otherwise."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "mmret", "xla")


def enable_compilation_cache(directory: str | None = None, min_compile_secs: float = 0.5):
  """Turns on JAX's persistent compilation cache in ``directory`` (default:
  ``default_compilation_cache()``; 'off' leaves it off). Programs that took at least
  ``min_compile_secs`` to compile are stored, keyed by the program, the JAX/XLA versions, the
  devices and the XLA flags, so a changed program or machine never reads a stale entry. Returns the
  directory, or None when off."""
  import jax  # noqa: PLC0415

  directory = directory or default_compilation_cache()
  if directory == "off":
    return None
  if "://" not in directory:
    os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  return directory


def initialize_jax():
  """Selects the platform, turns on the compilation cache and joins the multi-host job when one
  is configured."""
  import jax  # imported after flags so that --platform can take effect

  if _PLATFORM.value:
    jax.config.update("jax_platforms", _PLATFORM.value)
  cache = enable_compilation_cache(_COMPILATION_CACHE.value)
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
      "JAX process %d/%d, %d local / %d global devices (%s); compilation cache: %s",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].platform,
      cache or "off",
  )


def setup_logging():
  """absl logging without the libraries' per-file INFO lines."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
