"""Test setup: 8 fake CPU devices, fast compilation and a compilation cache (set before jax is
imported), parsed absl flags, and the embedded world prepared once per session."""

import os

# Tests run tiny programs a few times each, so compiling dominates: XLA's backend optimisation
# level 0 and the CPU's classic (non-MLIR) fusion emitters each halve compile times on the CPU;
# the persistent cache lets every later test (and the subprocesses tests start) reuse a program
# another test compiled.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_cpu_use_fusion_emitters=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain worker processes and absl-using code expect parsed flags.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def world_data_dir(tmp_path_factory):
  """A data directory shared by the tests that read the embedded world (prepared on first use)."""
  return str(tmp_path_factory.mktemp("mmret_data"))


def pytest_collection_modifyitems(config, items):
  """Slow tests first: the suite runs on two workers (pytest-xdist), and a long test started last
  would keep one worker busy while the other has nothing left to do."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# Modules whose tests are independent of each other (no shared module-scoped run) and heavy
# enough to be worth spreading over both workers; every other module's tests run on one worker,
# so that a module-scoped fixture (a training run, a model) is built once.
SPREAD_MODULES = {
    "tests/test_gradcache.py",
    "tests/test_losses_chunked.py",
    "tests/test_pretrained_bert.py",
    "tests/test_pretrained_clip.py",
    "tests/test_recipe_steps.py",
    "tests/test_shipped_towers.py",
}


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist scheduling by module (see SPREAD_MODULES), in collection order (slow first)."""
  from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415

  class ModuleScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      module = nodeid.split("::", 1)[0]
      return nodeid if module in SPREAD_MODULES else module

  config.option.loadscopereorder = False  # keep the collection order
  return ModuleScheduling(config, log)
