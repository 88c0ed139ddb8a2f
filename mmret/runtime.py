"""Process set-up shared by the entry points: multi-host JAX initialisation and logging.

Multi-host: pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or ``--distributed=auto`` to let JAX
detect the cluster (TPU pods, SLURM). Under SLURM each task is one JAX process, and
``slurm_layout`` decides which GPUs it uses (``--local_devices``). On CPU, collectives across
processes use gloo.
"""

import collections
import dataclasses
import os
import platform
import re

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
_LOCAL_DEVICES = flags.DEFINE_enum(
    "local_devices",
    "auto",
    ["auto", "all"],
    "Under SLURM with --distributed=auto: 'auto' gives each task one GPU, the one whose index is "
    "its SLURM_LOCALID (one task per GPU), or the GPUs SLURM bound to the task (--gpus-per-task); "
    "'all': each task uses every GPU it sees (one task per node).",
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


# What JAX's SLURM detection reads: without all of them it does not see a SLURM task.
_SLURM_TASK_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


class SlurmLayoutError(ValueError):
  """The SLURM allocation and the ``--local_devices`` choice do not give each task its own GPUs."""


@dataclasses.dataclass(frozen=True)
class SlurmLayout:
  """Where one SLURM task stands and which of the GPUs it sees it uses.

  ``local_device_ids`` goes to ``jax.distributed.initialize``: None leaves the choice to JAX (no
  GPU information), [] keeps every visible device (JAX narrows only for a non-empty list and fills
  in SLURM_LOCALID only for None). ``local_devices`` is the number of devices the process must
  see (None when unknown); ``warnings`` are for the log."""

  task: int
  tasks: int
  node: str
  node_index: int
  nodes: int
  local_task: int
  tasks_on_node: int
  node_gpus: int | None
  local_device_ids: list[int] | None
  local_devices: int | None
  warnings: tuple[str, ...] = ()

  def describe(self, local_devices: int) -> str:
    """The line every process logs after joining the job."""
    gpus = f" of the node's {self.node_gpus} GPUs" if self.node_gpus is not None else ""
    return (
        f"SLURM task {self.task}/{self.tasks} on node {self.node} (node {self.node_index}/"
        f"{self.nodes}, local task {self.local_task}/{self.tasks_on_node}): {local_devices} local "
        f"devices{gpus}"
    )


def _tasks_on_node(env, node_index: int, tasks: int, nodes: int) -> int:
  """Tasks of this step on node ``node_index``, from SLURM's compressed list ('8(x4)', '2(x3),1')."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if spec:
    counts = []
    for part in spec.split(","):
      match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
      if match:
        counts += [int(match[1])] * int(match[2] or 1)
    if node_index < len(counts):
      return counts[node_index]
  if env.get("SLURM_NTASKS_PER_NODE"):
    return int(env["SLURM_NTASKS_PER_NODE"])
  return -(-tasks // max(nodes, 1))


def slurm_layout(env, local_devices: str = "auto") -> SlurmLayout | None:
  """The GPUs of one SLURM task, from its environment ``env`` (a dict such as ``os.environ``);
  None outside a SLURM task.

  ``local_devices='auto'``: one task per GPU, task SLURM_LOCALID takes GPU SLURM_LOCALID of those
  the node's tasks see (JAX's own choice), unless SLURM bound GPUs to each task (--gpus-per-task,
  --gpu-bind: CUDA_VISIBLE_DEVICES lists fewer GPUs than SLURM_GPUS_ON_NODE), where GPU
  SLURM_LOCALID would not exist and the task takes the GPUs it sees. ``'all'``: one task per node,
  which takes every GPU it sees. Raises ``SlurmLayoutError`` when tasks would share a GPU or pick
  one they cannot see; GPUs that no task uses are a warning."""
  if not all(name in env for name in _SLURM_TASK_VARS):
    return None
  task, tasks = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
  local_task, node_index = int(env["SLURM_LOCALID"]), int(env.get("SLURM_NODEID") or 0)
  nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
  tasks_on_node = _tasks_on_node(env, node_index, tasks, nodes)
  per_node_var = f"SLURM_NTASKS={tasks} over {nodes} nodes"
  for name in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE"):
    per_node_var = f"{name}={env[name]}" if env.get(name) else per_node_var
  cuda = env.get("CUDA_VISIBLE_DEVICES")
  listed = len([gpu for gpu in (cuda or "").split(",") if gpu.strip() not in ("", "NoDevFiles")])
  node_gpus = int(env.get("SLURM_GPUS_ON_NODE") or 0) or listed or None
  visible = (node_gpus if cuda is None else listed) or None  # GPUs the task sees; None: unknown
  seen = f"CUDA_VISIBLE_DEVICES={cuda}" if cuda is not None else f"SLURM_GPUS_ON_NODE={node_gpus}"
  per_task = re.search(r"(\d+)$", env.get("SLURM_GPUS_PER_TASK", ""))
  # SLURM gave this task GPUs of its own: it sees fewer than the node has, or exactly its share.
  own = visible is not None and (
      visible < node_gpus or (per_task is not None and visible == int(per_task[1]))
  )
  where = f"task {task} (SLURM_PROCID) on node {node_index} (SLURM_NODEID)"
  warnings = []
  if env.get("JAX_LOCAL_DEVICE_IDS"):  # set by hand: it wins
    ids = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    count = len(ids)
  elif visible is None:  # no GPU information (CPU or TPU nodes)
    ids, count = ([] if local_devices == "all" else None), None
  elif local_devices == "all" or own:
    if local_devices == "all" and tasks_on_node > 1 and not own:
      raise SlurmLayoutError(
          f"--local_devices=all gives each task every GPU it sees, but {tasks_on_node} tasks on "
          f"the node ({per_node_var}) see the same {visible} GPUs ({seen}): start one task per "
          "node (sbatch --ntasks-per-node=1), or one per GPU without --local_devices=all"
      )
    ids, count = list(range(visible)), visible
    if local_devices == "auto" and tasks_on_node > 1:
      warnings.append(
          f"SLURM bound {visible} of the node's {node_gpus} GPUs to {where} ({seen}, "
          f"SLURM_GPUS_ON_NODE={node_gpus}): it uses those instead of GPU {local_task} "
          "(SLURM_LOCALID); sbatch --gpus-per-node instead of --gpus-per-task lets every task "
          "see the whole node"
      )
  elif local_task < visible:
    ids, count = [local_task], 1
  else:
    raise SlurmLayoutError(
        f"{where} would use GPU {local_task} (SLURM_LOCALID={local_task}), but it sees "
        f"{visible} GPUs ({seen}): more tasks on the node ({per_node_var}) than GPUs. Start one "
        "task per GPU (sbatch --ntasks-per-node=<GPUs per node>), or one per node with "
        "--local_devices=all"
    )
  if count is not None and node_gpus is not None and tasks_on_node * count < node_gpus:
    warnings.append(
        f"{tasks_on_node} task(s) x {count} GPU(s) use {tasks_on_node * count} of the node's "
        f"{node_gpus} GPUs ({per_node_var}, SLURM_GPUS_ON_NODE={node_gpus}): start one task per "
        f"GPU (sbatch --ntasks-per-node={node_gpus}), or one per node with --local_devices=all"
    )
  return SlurmLayout(
      task=task,
      tasks=tasks,
      node=env.get("SLURMD_NODENAME") or platform.node(),
      node_index=node_index,
      nodes=nodes,
      local_task=local_task,
      tasks_on_node=tasks_on_node,
      node_gpus=node_gpus,
      local_device_ids=ids,
      local_devices=count,
      warnings=tuple(warnings),
  )


def check_slurm_devices(layout: SlurmLayout, local_devices: int, platform_name: str):
  """After joining the job: (the line to log, whether the process sees as many devices as its
  layout gives it). A GPU process that sees another number raises ``SlurmLayoutError``."""
  line = layout.describe(local_devices)
  if layout.local_devices is None or local_devices == layout.local_devices:
    return line, True
  mismatch = (
      f"{line}, but its layout gives it {layout.local_devices} (GPUs {layout.local_device_ids} of "
      "those it sees, from SLURM_LOCALID, CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE and "
      "--local_devices)"
  )
  if platform_name in ("gpu", "cuda", "rocm"):
    raise SlurmLayoutError(mismatch)
  return mismatch, False


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
      layout = slurm_layout(os.environ, _LOCAL_DEVICES.value)
      for warning in layout.warnings if layout else ():
        logging.warning("%s", warning)
      jax.distributed.initialize(local_device_ids=layout.local_device_ids if layout else None)
      if layout:
        platform_name = jax.local_devices()[0].platform
        line, matches = check_slurm_devices(layout, jax.local_device_count(), platform_name)
        (logging.info if matches else logging.warning)("%s", line)
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
