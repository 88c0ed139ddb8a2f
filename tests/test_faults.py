"""Faults, driven through real processes where the fault is a process's: SIGTERM / SIGINT
(preemption, Ctrl-C) save and resume bit-identically, a second launch on a busy workdir is refused,
corrupt checkpoints are moved aside for the previous good one, two processes stop at the same step
and a relaunch on one process continues their data order. Pure logic (manifests, locks, value
checks, importers' hostile records, read errors, a full disk) is checked in-process."""

import errno
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from configs import clip, gcl, selfalign, solar
from mmret import checkpoint as ckpt_lib
from mmret import config_lib, faults, metrics_writer, train
from mmret import step as step_lib
from mmret.data import importers, pipeline, sources
from mmret.data.importers import writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CKPT_EVERY, BATCH = 12, 5, 16


def RUN(test):
  """Tests sharing the reference run (this module runs on one worker), started first (slow)."""
  return pytest.mark.slow(test)


# One block per tower: the faults are the run's, not the model's, and compiling is most of the time.
DEPTH = 1


def _config(data_dir):
  config = clip.get_config(f"steps={STEPS},evals=false")
  config.model.image.depth = config.model.text.depth = DEPTH
  config.input.data_dir = data_dir
  config.input.batch_size = BATCH
  config.log_every = 1
  config.ckpt_every = CKPT_EVERY
  return config


def _command(workdir, data_dir, *extra):
  return [
      sys.executable,
      "-m",
      "mmret.main",
      f"--config=configs/clip.py:steps={STEPS},evals=false",
      f"--workdir={workdir}",
      f"--config.input.data_dir={data_dir}",
      f"--config.input.batch_size={BATCH}",
      "--config.log_every=1",
      f"--config.ckpt_every={CKPT_EVERY}",
      f"--config.model.image.depth={DEPTH}",
      f"--config.model.text.depth={DEPTH}",
      *extra,
  ]


def _launch(command, log_path, env=None):
  return subprocess.Popen(
      command,
      cwd=REPO,
      env=env or dict(os.environ),
      stdout=open(log_path, "w"),
      stderr=subprocess.STDOUT,
  )


def _lines(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(x) for x in f if x.endswith("\n")]


def _wait_for_step(workdir, step, process, timeout=180):
  """Waits until ``metrics.jsonl`` holds ``step`` (the run is training)."""
  deadline = time.time() + timeout
  while not any(line["step"] >= step for line in _lines(workdir)):
    assert process.poll() is None, f"the run ended early ({process.returncode})"
    assert time.time() < deadline, f"no step {step} after {timeout} s"
    time.sleep(0.05)


def _checkpoints(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _params(workdir, config):
  setup = train.Setup(config)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state = checkpointer.restore(setup.abstract_state(step_lib.DeviceMapping(config.mapping)))
  finally:
    checkpointer.close()
  return int(state.step), jax.device_get(state.params)


@pytest.fixture(scope="module")
def straight(world_data_dir, tmp_path_factory):
  """(config, workdir) of the uninterrupted reference run, in this process."""
  sources.load_builder("mmret_world/tiny", world_data_dir)
  config = _config(world_data_dir)
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.run(config, workdir)
  return config, workdir


@pytest.fixture(scope="module")
def preempted(straight, world_data_dir, tmp_path_factory):
  """A run stopped by SIGTERM (while a second launch on its workdir is refused), relaunched and
  stopped by SIGINT, then run to the end: what each process did."""
  workdir = str(tmp_path_factory.mktemp("preempted"))
  facts = {"workdir": workdir}
  # mmret's default compilation cache (under XDG_CACHE_HOME), not the tests' own: the relaunch
  # must find there what the first launch compiled.
  cache_home = str(tmp_path_factory.mktemp("cache_home"))
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["XDG_CACHE_HOME"] = cache_home
  facts["default_cache"] = os.path.join(cache_home, "mmret", "xla")
  first = _launch(_command(workdir, world_data_dir), os.path.join(workdir, "first.log"), env)
  _wait_for_step(workdir, 2, first)
  # Paused while a second launch is tried (it holds its step and the workdir's lock), so that it
  # is still early in its run when SIGTERM comes.
  first.send_signal(signal.SIGSTOP)
  second = subprocess.run(
      _command(workdir, world_data_dir), cwd=REPO, capture_output=True, text=True, timeout=120
  )
  facts["second"] = (second.returncode, second.stderr, first.pid)
  facts["second_saw_lines"] = len(_lines(workdir))
  start = time.time()
  first.send_signal(signal.SIGCONT)
  first.send_signal(signal.SIGTERM)
  facts["sigterm"] = (first.wait(timeout=120), time.time() - start, _checkpoints(workdir))
  facts["sigterm_last_line"] = _lines(workdir)[-1]["step"]

  relaunch = _launch(_command(workdir, world_data_dir), os.path.join(workdir, "relaunch.log"), env)
  _wait_for_step(workdir, facts["sigterm_last_line"] + 2, relaunch)
  relaunch.send_signal(signal.SIGINT)
  facts["sigint"] = (relaunch.wait(timeout=120), _checkpoints(workdir), _lines(workdir)[-1]["step"])

  train.run(straight[0], workdir)  # the last relaunch, in this process (cheaper)
  return facts


@RUN
def test_second_launch_on_a_busy_workdir_is_refused_naming_the_holder(preempted):
  returncode, stderr, holder_pid = preempted["second"]
  assert returncode == 1, stderr[-2000:]
  assert "is in use by another run" in stderr and f"pid {holder_pid} " in stderr
  assert socket.gethostname() in stderr
  # It wrote nothing: the first run's lines are its own, each step once.
  steps = [line["step"] for line in _lines(preempted["workdir"])]
  assert steps == sorted(set(steps))


@RUN
def test_sigterm_saves_the_current_step_and_exits_0(preempted):
  returncode, seconds, checkpoints = preempted["sigterm"]
  assert returncode == 0, open(os.path.join(preempted["workdir"], "first.log")).read()[-3000:]
  last_step = preempted["sigterm_last_line"]
  assert last_step < STEPS
  assert checkpoints[-1] == last_step  # the step it was at, not the last periodic save
  assert seconds < 60
  log = open(os.path.join(preempted["workdir"], "first.log")).read()
  assert f"stopped by SIGTERM after step {last_step}" in log


@RUN
def test_sigint_saves_and_exits_130_then_the_run_resumes_bit_identically(preempted, straight):
  returncode, checkpoints, last_step = preempted["sigint"]
  log = open(os.path.join(preempted["workdir"], "relaunch.log")).read()
  assert returncode == 130, log[-3000:]
  assert checkpoints[-1] == last_step > preempted["sigterm_last_line"]
  assert f"stopped by SIGINT after step {last_step}" in log
  # The relaunch did not compile its train step: the first launch's was in the persistent
  # compilation cache, on by default in ~/.cache/mmret/xla.
  assert f"compilation cache: {preempted['default_cache']}" in log
  assert any(name.startswith("jit_") for name in os.listdir(preempted["default_cache"]))
  assert "loaded the train step from the compilation cache and ran step" in log, log[-3000:]
  first_log = open(os.path.join(preempted["workdir"], "first.log")).read()
  assert "compiled the train step and ran step 1" in first_log

  config, straight_dir = straight
  step_a, params_a = _params(straight_dir, config)
  step_b, params_b = _params(preempted["workdir"], config)
  assert step_a == step_b == STEPS
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  # Three launches, each step once in metrics.jsonl, with the straight run's losses.
  lines = _lines(preempted["workdir"])
  assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
  assert [line["loss"] for line in lines] == [line["loss"] for line in _lines(straight_dir)]


def _corrupt(path):
  """4 KiB of random bytes at a third of ``path``."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 3)
    f.write(np.random.default_rng(0).bytes(min(4096, size - size // 3)))


def _largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


@RUN
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_used(
    straight, tmp_path, caplog
):
  config, straight_dir = straight
  workdir = str(tmp_path / "run")
  shutil.copytree(straight_dir, workdir)
  _corrupt(_largest_file(os.path.join(workdir, "checkpoints", str(STEPS), "state")))
  with caplog.at_level(logging.WARNING):
    train.run(config, workdir)
  warning = next(r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage())
  assert os.path.join(workdir, "checkpoints", str(STEPS)) in warning
  assert "sha256" in warning
  # Moved aside, not deleted; training resumed from the previous checkpoint to the same end.
  assert os.path.isdir(os.path.join(workdir, "checkpoints", f"corrupt-{STEPS}"))
  assert _checkpoints(workdir)[-2:] == [10, STEPS]
  jax.tree.map(
      np.testing.assert_array_equal, _params(straight_dir, config)[1], _params(workdir, config)[1]
  )
  assert [line["step"] for line in _lines(workdir)] == list(range(1, STEPS + 1))


@RUN
def test_two_processes_stop_at_one_step_and_one_process_continues_their_data(
    straight, world_data_dir, tmp_path
):
  workdir = str(tmp_path / "multi")
  os.makedirs(workdir)
  port = 20000 + os.getpid() % 20000
  env = dict(
      os.environ,
      XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"),
  )
  processes = [
      _launch(
          _command(
              workdir,
              world_data_dir,
              f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2",
              f"--process_id={i}",
          ),
          os.path.join(workdir, f"proc{i}.log"),
          env,
      )
      for i in range(2)
  ]
  _wait_for_step(workdir, 2, processes[0], timeout=300)
  processes[1].send_signal(signal.SIGTERM)  # one process preempted: both must save one step
  codes = [p.wait(timeout=180) for p in processes]
  logs = [open(os.path.join(workdir, f"proc{i}.log")).read() for i in range(2)]
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  stopped = [int(log.split("stopped by SIGTERM after step ")[1].split(";")[0]) for log in logs]
  assert stopped[0] == stopped[1] == _checkpoints(workdir)[-1] < STEPS
  data = os.listdir(os.path.join(workdir, "checkpoints", str(stopped[0]), "data"))
  assert sorted(f for f in data if f.endswith(".json")) == [
      "process_0-of-2.json",
      "process_1-of-2.json",
  ]

  # Relaunched on 1 process (8 devices, same global batch): the same examples follow, so the
  # losses are the uninterrupted single-process run's (to float32 rounding: the global batch is
  # ordered by process).
  config, straight_dir = straight
  train.run(config, workdir)
  losses = [line["loss"] for line in _lines(workdir)]
  assert [line["step"] for line in _lines(workdir)] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses, [x["loss"] for x in _lines(straight_dir)], rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# Checkpoint manifests and fallback, on a toy state (no model).


def _toy_checkpoints(directory, values):
  """Checkpoints 1..n of a toy state whose array holds each of ``values``."""
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=10)
  for step, value in enumerate(values, start=1):
    checkpointer.save(step, {"w": np.full((64, 64), value, np.float32), "step": np.int32(step)})
  checkpointer.close()


_ABSTRACT = {
    "w": jax.ShapeDtypeStruct((64, 64), np.float32),
    "step": jax.ShapeDtypeStruct((), np.int32),
}


def test_every_save_has_a_manifest_that_catches_flipped_truncated_and_missing_files(tmp_path):
  _toy_checkpoints(str(tmp_path), [1.0, 2.0])
  step_dir = str(tmp_path / "2")
  manifest = faults.read_manifest(step_dir)
  assert manifest["step"] == 2 and manifest["process_count"] == 1
  assert set(manifest["files"]) == {
      os.path.relpath(os.path.join(r, f), step_dir)
      for r, _, fs in os.walk(step_dir)
      for f in fs
      if f != faults.MANIFEST_FILE
  }
  assert faults.verify_manifest(step_dir) is None
  target = _largest_file(os.path.join(step_dir, "state"))
  original = open(target, "rb").read()
  _corrupt(target)
  assert "sha256" in faults.verify_manifest(step_dir)
  open(target, "wb").write(original[:16])
  assert "bytes" in faults.verify_manifest(step_dir)
  os.remove(target)
  assert "missing" in faults.verify_manifest(step_dir)
  with pytest.raises(ckpt_lib.CheckpointError, match=step_dir):
    ckpt_lib.Checkpointer(str(tmp_path)).restore(_ABSTRACT)


def test_restore_falls_back_past_corrupt_and_non_finite_checkpoints(tmp_path):
  _toy_checkpoints(str(tmp_path), [1.0, 2.0, np.nan, 4.0])
  _corrupt(_largest_file(str(tmp_path / "4" / "state")))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=10)
  assert checkpointer.last_good() == str(tmp_path / "3")  # verifies; its values are not checked
  step, state = checkpointer.restore_latest_good(_ABSTRACT)
  assert step == 2 and float(state["w"][0, 0]) == 2.0
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "corrupt-3", "corrupt-4"]
  assert checkpointer.latest_step() == 2
  checkpointer.close()


def test_no_usable_checkpoint_is_an_error_after_moving_each_aside(tmp_path):
  _toy_checkpoints(str(tmp_path), [np.inf])
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointError, match="corrupt-1"):
    checkpointer.restore_latest_good(_ABSTRACT)
  checkpointer.close()


# ----------------------------------------------------------------------------------------------
# The workdir lock.


def test_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path, caplog):
  faults.WorkdirLock(str(tmp_path)).check_free()
  assert not os.listdir(tmp_path)  # checking writes nothing
  lock = faults.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(faults.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
    faults.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(faults.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
    faults.WorkdirLock(str(tmp_path)).check_free()
  lock.release()
  faults.WorkdirLock(str(tmp_path)).check_free()
  # A lock file left by a killed run: its process is gone.
  dead = subprocess.Popen(["true"])
  dead.wait()
  with open(tmp_path / faults.LOCK_FILE, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}, f)
  with caplog.at_level(logging.WARNING):
    lock = faults.WorkdirLock(str(tmp_path)).acquire()
  assert f"stale lock {tmp_path / faults.LOCK_FILE} of pid {dead.pid}" in caplog.text
  assert json.load(open(tmp_path / faults.LOCK_FILE))["pid"] == os.getpid()
  lock.release()


# ----------------------------------------------------------------------------------------------
# Values checked before any work.


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("total_steps", -5, "config.total_steps=-5: must be an integer >= 1"),
        ("log_every", 0, "config.log_every=0: must be an integer >= 1"),
        ("ckpt_every", -1, "config.ckpt_every=-1: must be an integer >= 0"),
        ("input.batch_size", 0, "config.input.batch_size=0: must be an integer >= 1"),
        ("optim.lr", -1e-3, "config.optim.lr=-0.001: must be a finite number > 0"),
        ("optim.lr", float("nan"), "config.optim.lr=nan: must be a finite number > 0"),
        ("mapping", "pjit", "config.mapping='pjit': must be one of 'pmap', 'shard_map'"),
    ],
)
def test_impossible_values_are_refused_before_any_work(tmp_path, field, value, message):
  config = clip.get_config("steps=2,evals=false")  # short, should the check be missing
  config.input.data_dir = str(tmp_path / "data")
  *parents, name = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value
  workdir = tmp_path / "run"
  with pytest.raises(faults.ConfigError) as error:
    train.run(config, str(workdir))
  assert message in str(error.value)
  assert not workdir.exists()  # nothing written


def test_eval_intervals_and_batch_sizes_are_checked_and_every_shipped_config_passes():
  for module in (clip, gcl, selfalign, solar):
    for _, stage in train.stage_configs(module.get_config()):
      faults.check_config(stage)
  config = clip.get_config("")
  config.evals.caption5.every = 0  # at the end only
  faults.check_config(config)
  config.evals.caption5.every = -100
  with pytest.raises(faults.ConfigError, match="config.evals.caption5.every=-100: must be an"):
    faults.check_config(config)
  config.evals.caption5.every, config.evals.universal.batch_size = 0, 0
  with pytest.raises(faults.ConfigError, match="config.evals.universal.batch_size=0"):
    faults.check_config(config)


def test_config_arguments_accept_only_real_booleans():
  assert config_lib.parse_arg("evals=No", evals=True).evals is False
  assert config_lib.parse_arg("evals=1", evals=False).evals is True
  with pytest.raises(ValueError, match="evals='ture' is not a boolean: use true/false"):
    clip.get_config("evals=ture")
  with pytest.raises(ValueError, match="steps='many' is not a int"):
    clip.get_config("steps=many")
  with pytest.raises(KeyError, match="unknown config argument 'size2'"):
    clip.get_config("size2=tiny")


def test_size_derived_model_fields_can_be_overridden(monkeypatch):
  argv = [
      "prog",
      f"--config={os.path.join(REPO, 'configs', 'clip.py')}:evals=false",
      "--config.model.embed_dim=32",
      "--config.model.image.width=48",
      "--config.model.image.ln_pre=true",
  ]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  values = flags.FlagValues()
  flag = config_flags.DEFINE_config_file("config", None, "", flag_values=values)
  values(argv)
  model = flag.value.model
  assert (model.embed_dim, model.image.width, model.image.ln_pre) == (32, 48, True)
  assert model.text.width is None  # still the size's


def test_bad_command_lines_exit_1_naming_the_field(tmp_path):
  runs = {
      "unknown": ["--config.model.embedding_dim=32"],
      "negative": ["--config.total_steps=-5"],
  }
  processes = {
      name: subprocess.Popen(
          [
              sys.executable,
              "-m",
              "mmret.main",
              "--config=configs/clip.py:evals=false",
              f"--workdir={tmp_path / name}",
              *args,
          ],
          cwd=REPO,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for name, args in runs.items()
  }
  results = {name: (p.wait(timeout=120), p.stderr.read()) for name, p in processes.items()}
  code, stderr = results["unknown"]
  assert code == 1 and "config.model.embedding_dim is not a config field" in stderr, stderr
  assert "'embed_dim'" in stderr  # the fields it could have been
  code, stderr = results["negative"]
  assert code == 1 and "config.total_steps=-5: must be an integer >= 1" in stderr, stderr
  assert not os.path.exists(tmp_path / "negative")


# ----------------------------------------------------------------------------------------------
# Hostile records and files.


def test_hostile_records_are_skipped_counted_and_named(tmp_path):
  import test_importers as helpers

  src = str(tmp_path / "coco")
  helpers._coco_fixture(src, n_images=3, captions_per_image=5)

  def hostile(content):
    content["annotations"][0]["caption"] = "x \udcff"  # valid JSON, not encodable text
    huge = os.path.join(src, "val2017", content["images"][1]["file_name"])
    Image.new("1", (8000, 8000)).save(huge, format="PNG")  # 64 megapixels, small file

  helpers._edit_coco(src, hostile)
  out = str(tmp_path / "out")
  summary = importers.import_dataset("coco", src, out, split="val2017", outputs=("pairs",))
  problems = summary["splits"]["val2017"]["problems"]
  bad_id = 1000  # the first caption's annotation id
  assert problems["bad_encoding"]["count"] == 1
  assert problems["bad_encoding"]["examples"][0]["id"] == str(bad_id)
  assert "surrogate" in problems["bad_encoding"]["examples"][0]["detail"]
  assert problems["too_many_pixels"]["count"] == 5  # the huge image's 5 captions
  assert "8000x8000" in problems["too_many_pixels"]["examples"][0]["detail"]
  assert summary["splits"]["val2017"]["written"] == 15 - 1 - 5
  # The limit is configurable.
  again = importers.import_dataset(
      "coco",
      src,
      str(tmp_path / "out2"),
      split="val2017",
      outputs=("pairs",),
      max_pixels=100_000_000,
  )
  assert "too_many_pixels" not in again["splits"]["val2017"]["problems"]


def test_stale_staging_folders_of_killed_imports_are_removed(tmp_path):
  import test_importers as helpers

  src = str(tmp_path / "coco")
  helpers._coco_fixture(src, n_images=1, captions_per_image=5)
  dead = subprocess.Popen(["true"])
  dead.wait()
  host = socket.gethostname()
  stale = [
      tmp_path / f".out.incomplete-{host}-{dead.pid}-0123abcd",  # a killed import
      tmp_path / ".out.incomplete-0123abcd",  # a killed import of an older mmret
  ]
  live = tmp_path / f".out.incomplete-{host}-{os.getpid()}-0123abcd"  # an import running now
  for path in stale + [live]:
    os.makedirs(path / "mmret_import")
  importers.import_dataset("coco", src, str(tmp_path / "out"), split="val2017")
  assert not any(path.exists() for path in stale)
  assert live.exists()
  assert writer.is_complete_dataset(str(tmp_path / "out"))


def test_truncated_array_record_names_file_and_split(world_data_dir, tmp_path):
  sources.load_builder("mmret_world/tiny", world_data_dir)
  data_dir = str(tmp_path / "data")
  shutil.copytree(
      os.path.join(world_data_dir, "mmret_world"), os.path.join(data_dir, "mmret_world")
  )
  (path,) = glob.glob(os.path.join(data_dir, "mmret_world", "tiny", "*", "*-train.array_record*"))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  config = clip.get_config("evals=false")
  config.input.data_dir, config.input.batch_size = data_dir, 16
  sources.load_builder.cache_clear()  # the copy is another dataset directory
  try:
    with pytest.raises(Exception) as error:
      next(pipeline.make_train_iterator(config.input, seed=0))
  finally:
    sources.load_builder.cache_clear()
  message = str(error.value)
  assert path in message and "split 'train'" in message, message


def test_full_disk_is_reported_at_the_failing_metrics_write(tmp_path):
  if not os.path.exists("/dev/full"):
    pytest.skip("no /dev/full here")
  writer_ = metrics_writer.MetricWriter(str(tmp_path))
  os.symlink("/dev/full", tmp_path / "full")
  writer_.jsonl_path = str(tmp_path / "full")
  with pytest.raises(OSError) as error:
    writer_.write(1, {"loss": 1.0})
  assert error.value.errno == errno.ENOSPC
  assert str(tmp_path / "full") in str(error.value) and "disk is full" in str(error.value)
  writer_.close()


def test_any_failure_of_one_record_is_a_bad_record_naming_it():
  def build():
    return {"caption": "fine", "count": 1 // 0}

  with pytest.raises(importers.BadRecord) as problem:
    writer._built_and_checked(build, "id7", "captions.json")
  assert problem.value.reason == "unreadable_record" and problem.value.record_id == "id7"
  assert "ZeroDivisionError" in problem.value.detail


def test_full_disk_during_an_asynchronous_save_is_reported_naming_the_checkpoint(tmp_path):
  """A 200 KiB filesystem (tmpfs, when this process may mount one) fills up during a save."""
  mount_point = tmp_path / "small_disk"
  mount_point.mkdir()
  mounted = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount_point)], capture_output=True
  )
  if mounted.returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    checkpointer = ckpt_lib.Checkpointer(str(mount_point / "checkpoints"))
    incompressible = np.random.default_rng(0).random((256, 1024), np.float32)  # 1 MiB
    checkpointer.save(1, {"w": incompressible})
    with pytest.raises(ckpt_lib.CheckpointError) as error:
      for _ in range(600):  # what the training loop does after each step
        checkpointer.poll()
        time.sleep(0.05)
    assert f"saving checkpoint {mount_point / 'checkpoints' / '1'} failed" in str(error.value)
    assert "RESOURCE_EXHAUSTED" in str(error.value) or "space" in str(error.value)
    assert checkpointer.all_steps() == []  # never looks complete
  finally:
    subprocess.run(["umount", "-l", str(mount_point)])


class _Iterator:

  def set_state(self, state):
    self.state = state


def test_data_position_of_another_process_count_is_carried_over_or_refused(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  data_dir = tmp_path / "7" / "data"
  data_dir.mkdir(parents=True)
  for i in range(2):
    (data_dir / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 7}))
  iterator = _Iterator()
  checkpointer._restore_data(7, iterator)
  assert iterator.state == {"next_index": 7}
  # A position that is not a plain batch index (e.g. worker processes' states) is refused.
  (data_dir / "process_1-of-2.json").write_text(json.dumps({"workers": [3, 4]}))
  with pytest.raises(ckpt_lib.CheckpointError, match="saved by 2 processes, this run has 1") as e:
    checkpointer._restore_data(7, iterator)
  assert "Relaunch with 2 processes" in str(e.value)
  checkpointer.close()
