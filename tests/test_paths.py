"""Workdirs, checkpoints, metrics, reports, locks, manifests, datasets and feature caches on URLs.

``gs://bucket/...`` is served by a fake ``etils.epath`` backend that maps it to a temporary
folder, so each test shows that files land there and that nothing named ``gs:`` is created under
the working directory (what ``os.path.abspath`` or a plain ``open`` of the URL would do). Orbax's
TensorStore writes do not go through epath: the checkpoint tests check the directory Orbax is
given. The same code on local paths is covered here and by the existing end-to-end tests.
"""

import json
import os
import types
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from PIL import Image

from mmret import checkpoint as ckpt_lib
from mmret import faults, feature_cache, metrics_writer
from mmret.data import sources
from mmret.evals import report

URL = "gs://bucket/run"


class _MappedBackend(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """The local filesystem, with ``gs://<path>`` read and written at ``<root>/<path>``."""

  def __init__(self, root: str):
    self.root = root

  def _local(self, path) -> str:
    path = os.fspath(path)
    return os.path.join(self.root, path[len("gs://") :]) if path.startswith("gs://") else path

  def _url(self, path) -> str:
    return "gs://" + os.path.relpath(os.fspath(path), self.root)

  def open(self, path, mode):
    return super().open(self._local(path), mode)

  def exists(self, path):
    return super().exists(self._local(path))

  def isdir(self, path):
    return super().isdir(self._local(path))

  def listdir(self, path):
    return super().listdir(self._local(path))

  def glob(self, path):
    return [self._url(p) for p in super().glob(self._local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in super().walk(self._local(top), top_down=top_down, on_error=on_error):
      yield self._url(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self._local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().mkdir(self._local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    return super().rmtree(self._local(path))

  def remove(self, path):
    return super().remove(self._local(path))

  def rename(self, path, dst):
    return super().rename(self._local(path), self._local(dst))

  def replace(self, path, dst):
    return super().replace(self._local(path), self._local(dst))

  def copy(self, path, dst, *, overwrite):
    return super().copy(self._local(path), self._local(dst), overwrite=overwrite)

  def stat(self, path):
    return super().stat(self._local(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The folder ``gs://`` maps to; the test runs in an empty working directory."""
  root = tmp_path / "gcs"
  root.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  fake = _MappedBackend(str(root))
  with (
      mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"gs": fake}),
      mock.patch.object(gpath, "_is_tf_installed", lambda: False),
  ):
    yield root
  made = [os.path.join(r, n) for r, ds, fs in os.walk(cwd) for n in ds + fs]
  assert not [p for p in made if "gs:" in p], f"a URL became a local path: {made}"
  assert not made, f"files were written under the working directory: {made}"


def test_metrics_writer_writes_rewinds_and_reads_on_a_url(bucket):
  writer = metrics_writer.MetricWriter(URL)
  assert writer.jsonl_path == f"{URL}/metrics.jsonl"
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.rewind(2)
  writer.write(3, {"loss": 0.25})
  writer.close()
  records = metrics_writer.read_metrics(f"{URL}/metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  assert (bucket / "bucket/run/metrics.jsonl").is_file()
  (event_file,) = (bucket / "bucket/run/tensorboard").iterdir()
  assert writer.events_path == f"{URL}/tensorboard/{event_file.name}"
  # The file version header and four scalar events, each a valid TFRecord.
  assert len(list(metrics_writer.read_tfrecords(writer.events_path))) == 5


def test_reports_and_training_curves_on_a_url(bucket):
  metrics = {"i2t/recall@1": 40.0, "i2t/recall@5": 70.0, "t2i/recall@1": 35.0}
  paths = report.write_reports(URL, "flickr", "caption5", 10, metrics)
  report.write_reports(URL, "flickr", "caption5", 20, metrics)
  assert paths == {k: f"{URL}/eval/flickr.{k}" for k in ("json", "md", "png")}
  local = bucket / "bucket/run/eval"
  assert [e["step"] for e in json.loads((local / "flickr.json").read_text())["history"]] == [10, 20]
  assert "recall@5" in (local / "flickr.md").read_text()
  assert Image.open(local / "flickr.png").format == "PNG"
  writer = metrics_writer.MetricWriter(URL)
  writer.write(1, {"loss": 2.0, "lr": 0.1})
  writer.write(2, {"loss": 1.0, "lr": 0.1})
  assert report.write_training_curves(URL, ("recall@1",)) == f"{URL}/curves.png"
  assert Image.open(bucket / "bucket/run/curves.png").format == "PNG"


def test_workdir_lock_on_a_url_records_the_holder_and_never_crashes(bucket):
  local = bucket / "bucket/run/mmret.lock"
  faults.WorkdirLock(URL).check_free()  # nothing there yet
  lock = faults.WorkdirLock(URL).acquire()
  assert json.loads(local.read_text())["pid"] == os.getpid()
  lock.release()
  assert local.read_text() == ""  # empty = free
  # A live process of this host holding it: refused, naming it.
  alive = {"host": faults.socket.gethostname(), "pid": os.getppid(), "command": "other run"}
  local.write_text(json.dumps(alive))
  with pytest.raises(faults.WorkdirLockedError, match=f"pid {os.getppid()} on host"):
    faults.WorkdirLock(URL).check_free()
  with pytest.raises(faults.WorkdirLockedError, match=f"pid {os.getppid()} on host"):
    faults.WorkdirLock(URL).acquire()
  # A holder that cannot be checked (another host): taken over.
  local.write_text(json.dumps(dict(alive, host="elsewhere")))
  with faults.WorkdirLock(URL):
    assert json.loads(local.read_text())["host"] == faults.socket.gethostname()


def test_checkpoint_manifest_on_a_url(bucket):
  step_dir = f"{URL}/checkpoints/2"
  for name, data in (("state/a", b"x" * 100), ("state/sub/b", b"y" * 7), ("data/p.json", b"{}")):
    path = epath.Path(step_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  assert faults.write_manifest(step_dir, step=2) == f"{step_dir}/{faults.MANIFEST_FILE}"
  local = bucket / "bucket/run/checkpoints/2"
  manifest = json.loads((local / faults.MANIFEST_FILE).read_text())
  assert sorted(manifest["files"]) == ["data/p.json", "state/a", "state/sub/b"]
  assert manifest["files"]["state/a"]["size"] == 100
  assert faults.verify_manifest(step_dir) is None
  (local / "state/a").write_bytes(b"x" * 99 + b"z")
  assert "state/a does not match its sha256" in faults.verify_manifest(step_dir)


class _Manager:
  """Stands in for Orbax's CheckpointManager, recording the directory it was given."""

  directories = []

  def __init__(self, directory, options=None):
    del options
    self.directories.append(directory)

  def reload(self):
    pass


def test_checkpointer_hands_orbax_the_url_unchanged(bucket, monkeypatch):
  monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", _Manager)
  _Manager.directories.clear()
  checkpointer = ckpt_lib.Checkpointer(f"{URL}/checkpoints")
  assert _Manager.directories == [f"{URL}/checkpoints"]
  assert checkpointer.directory == f"{URL}/checkpoints"
  assert checkpointer.step_dir(4) == f"{URL}/checkpoints/4"
  # Local directories are still made absolute.
  assert ckpt_lib.Checkpointer("ckpts").directory == os.path.abspath("ckpts")
  # The data iterator's position, saved by 2 processes, read back through the glob.
  data = bucket / "bucket/run/checkpoints/4/data"
  data.mkdir(parents=True)
  for i in range(2):
    (data / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 6}))
  iterator = types.SimpleNamespace(set_state=lambda state: positions.append(state))
  positions = []
  checkpointer._restore_data(4, iterator)
  assert positions == [{"next_index": 6}]
  # A corrupt checkpoint is moved aside on the bucket.
  assert checkpointer._move_aside(4, "broken") == f"{URL}/checkpoints/corrupt-4"
  assert (bucket / "bucket/run/checkpoints/corrupt-4/data").is_dir()
  assert not (bucket / "bucket/run/checkpoints/4").exists()


def test_dataset_paths_on_a_url_go_to_tfds_unchanged(bucket, monkeypatch):
  import tensorflow_datasets as tfds

  monkeypatch.setenv("MMRET_DATA_DIR", "gs://bucket/data")
  assert sources.default_data_dir() == "gs://bucket/data"
  opened = []
  monkeypatch.setattr(tfds, "builder_from_directory", lambda path: opened.append(path) or path)
  sources.load_builder.cache_clear()
  try:
    with pytest.raises(FileNotFoundError, match="gs://bucket/data/flickr is not a prepared"):
      sources.load_builder("gs://bucket/data/flickr")
    (bucket / "bucket/data/flickr").mkdir(parents=True)
    (bucket / "bucket/data/flickr/dataset_info.json").write_text("{}")
    assert sources.load_builder("gs://bucket/data/flickr") == "gs://bucket/data/flickr"
  finally:
    sources.load_builder.cache_clear()
  assert opened == ["gs://bucket/data/flickr"]


def test_feature_cache_on_a_url_is_built_locally_and_copied(bucket, tmp_path, monkeypatch):
  monkeypatch.setattr(feature_cache.tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  directory = "gs://bucket/data/feature_cache/train-0123"
  writer = feature_cache._Writer(directory, np.dtype("float16"))
  writer.write("image_pooled", 0, np.ones((2, 3), np.float32), 4)
  writer.write("image_pooled", 2, np.full((2, 3), 2.0, np.float32), 4)
  store = writer.commit({"kind": "test"})
  local = bucket / "bucket/data/feature_cache/train-0123"
  assert sorted(p.name for p in local.iterdir()) == ["image_pooled.npy", "manifest.json"]
  np.testing.assert_array_equal(store.array("image_pooled")[:, 0], [1, 1, 2, 2])
  # Read through a local copy (memory maps need local files), made once.
  copies = list((tmp_path / "tmp/mmret_feature_cache").iterdir())
  assert [p.name for p in copies] == ["gs_bucket_data_feature_cache_train-0123"]
  assert not [p for p in (tmp_path / "tmp").iterdir() if p.name != "mmret_feature_cache"]


def test_import_to_a_url_is_generated_locally_and_moved_into_place(bucket, tmp_path, monkeypatch):
  import io

  from mmret.data.importers import records, schema, writer

  monkeypatch.setattr(writer.tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  png = io.BytesIO()
  Image.new("RGB", (4, 4), "red").save(png, format="PNG")

  def source():
    for i in range(2):
      yield f"r{i}", "ann.json", lambda i=i: {
          "id": f"r{i}",
          "image": png.getvalue(),
          "caption": "a",
      }

  plan = writer.ImportPlan("test", {"train": schema.pairs_features()}, {"train": source})
  out = "gs://bucket/data/pairs"
  assert writer.write_dataset(plan, out, records.ProblemLog()) == out
  local = bucket / "bucket/data"
  assert sorted(p.name for p in local.iterdir()) == ["pairs"]  # no staging folder left
  names = {p.name for p in (local / "pairs").iterdir()}
  assert {writer.DATASET_INFO_FILE, writer.SUMMARY_FILE} <= names
  assert any(".array_record" in name for name in names)
  assert writer.is_complete_dataset(out)
  with pytest.raises(FileExistsError, match="already exists at gs://bucket/data/pairs"):
    writer.write_dataset(plan, out, records.ProblemLog())
  assert not list((tmp_path / "tmp").glob("mmret-import-*"))  # the local build is removed
