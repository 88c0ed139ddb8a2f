"""Launchers without a cluster: the SLURM GPU layout of every task (from its environment), the TPU
pod launcher against a fake gcloud whose workers are folders here (the remote command runs in them
with fake uv/python), and launch/local.sh's arguments. No JAX compilation."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from mmret import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _task(tasks_per_node, nodes=2, node=1, local=0, gpus=8, visible=None, **extra):
  """A task's environment as srun sets it for sbatch --nodes --ntasks-per-node --gpus-per-node."""
  env = {
      "SLURM_JOB_ID": "4242",
      "SLURM_STEP_NODELIST": f"gpu[001-{nodes:03d}]",
      "SLURM_STEP_NUM_NODES": str(nodes),
      "SLURM_NTASKS": str(nodes * tasks_per_node),
      "SLURM_PROCID": str(node * tasks_per_node + local),
      "SLURM_LOCALID": str(local),
      "SLURM_NODEID": str(node),
      "SLURMD_NODENAME": f"gpu{node + 1:03d}",
      "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
      "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
      "SLURM_GPUS_ON_NODE": str(gpus),
      "CUDA_VISIBLE_DEVICES": ",".join(map(str, visible if visible is not None else range(gpus))),
  }
  env.update(extra)
  return env


def test_slurm_one_task_per_gpu():
  layout = runtime.slurm_layout(_task(8, local=5))
  assert (layout.local_device_ids, layout.local_devices, layout.warnings) == ([5], 1, ())
  assert (layout.task, layout.tasks, layout.tasks_on_node, layout.node_gpus) == (13, 16, 8, 8)
  assert runtime.check_slurm_devices(layout, 1, "gpu") == (
      "SLURM task 13/16 on node gpu002 (node 1/2, local task 5/8): 1 local devices of the node's "
      "8 GPUs",
      True,
  )


def test_slurm_one_task_per_node_sees_all_gpus():
  layout = runtime.slurm_layout(_task(1), "all")
  assert (layout.local_device_ids, layout.local_devices, layout.warnings) == (list(range(8)), 8, ())
  assert runtime.check_slurm_devices(layout, 8, "gpu")[1]
  with pytest.raises(
      runtime.SlurmLayoutError, match=r"1 local devices.*layout gives it 8 \(GPUs \[0, 1"
  ):
    runtime.check_slurm_devices(layout, 1, "gpu")  # JAX narrowed it to one GPU after all
  # On CPU (or TPU) nodes there is no GPU to choose: [] keeps all devices, nothing to check.
  cpu = {k: v for k, v in _task(1).items() if "GPU" not in k and "CUDA" not in k}
  layout = runtime.slurm_layout(cpu, "all")
  assert (layout.local_device_ids, layout.local_devices, layout.node_gpus) == ([], None, None)
  assert runtime.check_slurm_devices(layout, 4, "cpu") == (
      "SLURM task 1/2 on node gpu002 (node 1/2, local task 0/1): 4 local devices",
      True,
  )
  assert runtime.slurm_layout(cpu).local_device_ids is None  # JAX's own choice


def test_slurm_gpus_per_task_binding_is_fixed():
  """--gpus-per-task=1: SLURM shows each task only its GPU, so JAX's GPU SLURM_LOCALID (5) would
  not exist; the task takes the GPU it sees instead, and says why."""
  from jax._src import clusters  # noqa: PLC0415

  env = _task(8, local=5, visible=[5], SLURM_GPUS_PER_TASK="1")
  layout = runtime.slurm_layout(env)
  assert (layout.local_device_ids, layout.local_devices) == ([0], 1)
  assert len(layout.warnings) == 1 and "SLURM_LOCALID" in layout.warnings[0], layout.warnings
  assert "--gpus-per-task" in layout.warnings[0] and "CUDA_VISIBLE_DEVICES=5" in layout.warnings[0]
  # Without SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_TASK tells the same.
  no_count = {k: v for k, v in env.items() if k != "SLURM_GPUS_ON_NODE"}
  assert runtime.slurm_layout(no_count).local_device_ids == [0]
  # --gpus-per-task=2: the task's two GPUs.
  env = _task(4, local=3, visible=[6, 7], SLURM_GPUS_PER_TASK="gpu:2")
  assert runtime.slurm_layout(env).local_device_ids == [0, 1]
  # What JAX would do on its own with these variables (the device it would select), and that the
  # [] of --local_devices=all keeps JAX from narrowing.
  old = dict(os.environ)
  try:
    os.environ.update(_task(8, local=5, visible=[5]))
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    assert detect(None, None, None, None, None, 300)[3] == [5]
    assert detect(None, None, None, [], None, 300)[3] == []
  finally:
    os.environ.clear()
    os.environ.update(old)


def test_slurm_refuses_tasks_sharing_gpus():
  with pytest.raises(
      runtime.SlurmLayoutError, match="SLURM_LOCALID=5.*CUDA_VISIBLE_DEVICES=0,1,2,3"
  ):
    runtime.slurm_layout(_task(8, local=5, gpus=4))  # 8 tasks, 4 GPUs
  with pytest.raises(runtime.SlurmLayoutError, match=r"SLURM_STEP_TASKS_PER_NODE=8\(x2\)"):
    runtime.slurm_layout(_task(8, local=5), "all")  # 8 tasks, each taking all 8 GPUs


def test_slurm_warns_about_idle_gpus():
  """The old layout (one task per node, JAX's one GPU per task): 7 of 8 GPUs idle."""
  (warning,) = runtime.slurm_layout(_task(1)).warnings
  assert "1 of the node's 8 GPUs" in warning and "SLURM_GPUS_ON_NODE=8" in warning
  assert "--ntasks-per-node=8" in warning and "--local_devices=all" in warning
  (warning,) = runtime.slurm_layout(_task(2, local=1, visible=[2, 3]), "all").warnings
  assert "use 4 of the node's 8 GPUs" in warning


def test_slurm_layout_outside_slurm_and_uneven_nodes():
  assert runtime.slurm_layout({}) is None
  # An salloc shell has the job's variables but no task's: not a SLURM task.
  assert runtime.slurm_layout({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}) is None
  env = _task(2, nodes=4, node=3, local=0, SLURM_STEP_TASKS_PER_NODE="3(x2),2,1")
  del env["SLURM_NTASKS_PER_NODE"]
  assert runtime.slurm_layout(env).tasks_on_node == 1


# srun as SLURM runs it inside a batch job: it reads the allocation from the job's environment
# (nodes, tasks per node, node names, GPUs per node) unless its own options say otherwise, starts
# every task with the variables srun sets (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS,
# SLURM_STEP_*...), forwards their output and fails when a task fails. Every "node" is this
# machine, its GPUs fake CPU devices (each task sees those of its node, as without
# --gpus-per-task).
FAKE_SRUN = """#!{python}
import os, subprocess, sys

options, command = {{}}, sys.argv[1:]
while command and command[0].startswith("-"):
  name, _, value = command.pop(0).lstrip("-").partition("=")
  options[name] = value
env = os.environ
nodes = int(options.get("nodes") or env["SLURM_JOB_NUM_NODES"])
per_node = int(options.get("ntasks-per-node") or env["SLURM_NTASKS_PER_NODE"])
names = env["SLURM_JOB_NODELIST"].split(",")[:nodes]
tasks = []
for node in range(nodes):
  for local in range(per_node):
    task_env = dict(
        env,
        SLURM_PROCID=str(node * per_node + local),
        SLURM_LOCALID=str(local),
        SLURM_NODEID=str(node),
        SLURMD_NODENAME=names[node],
        SLURM_NTASKS=str(nodes * per_node),
        SLURM_NPROCS=str(nodes * per_node),
        SLURM_STEP_ID="0",
        SLURM_STEPID="0",
        SLURM_STEP_NODELIST=",".join(names),
        SLURM_STEP_NUM_NODES=str(nodes),
        SLURM_STEP_NUM_TASKS=str(nodes * per_node),
        SLURM_STEP_TASKS_PER_NODE=f"{{per_node}}(x{{nodes}})",
        XLA_FLAGS=env.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=" + env["SLURM_GPUS_ON_NODE"],
        JAX_PLATFORMS="cpu",
    )
    tasks.append(subprocess.Popen(command, env=task_env))
codes = [task.wait() for task in tasks]
sys.exit(max(codes, key=abs))
"""


def _free_job_id():
  """A SLURM job id whose coordinator port (JAX: 61440 + job id % 4096) is free here."""
  start = os.getpid() % 4096
  for offset in range(4096):
    port = 61440 + (start + offset) % 4096
    with socket.socket(socket.AF_INET6) as probe:  # JAX binds [::]:port
      try:
        probe.bind(("::", port))
      except OSError:
        continue
    return 4096 * 100 + port - 61440
  raise RuntimeError("no free port in 61440-65535")


def run_sbatch(args, *, nodes, gpus_per_node, submit_dir, bin_dir, ntasks_per_node=None, env=None):
  """Runs launch/slurm_gpu.sbatch as ``sbatch --nodes=N [--ntasks-per-node=T]
  --gpus-per-node=G launch/slurm_gpu.sbatch ARGS`` would on the job's first node: options not
  given come from the script's #SBATCH lines, the job's variables are set, and the fake srun
  (written into ``bin_dir``, first on PATH) starts the tasks. The nodes are 'localhost',
  '127.0.0.1', '127.0.0.2'...; the job id gives a free coordinator port. ``env``: more
  variables."""
  script = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
  header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", open(script).read(), re.M))
  per_node = int(ntasks_per_node or header.get("ntasks-per-node", 1))
  os.makedirs(bin_dir, exist_ok=True)
  srun = os.path.join(bin_dir, "srun")
  open(srun, "w").write(FAKE_SRUN.format(python=sys.executable))
  os.chmod(srun, 0o755)
  names = ",".join(["localhost"] + [f"127.0.0.{i + 1}" for i in range(nodes - 1)])
  job_id = str(_free_job_id())
  env = dict(
      os.environ,
      **(env or {}),
      PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
      SLURM_JOB_ID=job_id,
      SLURM_JOBID=job_id,
      SLURM_JOB_NAME=header.get("job-name", "sbatch"),
      SLURM_SUBMIT_DIR=str(submit_dir),
      SLURM_JOB_NODELIST=names,
      SLURM_NODELIST=names,
      SLURM_JOB_NUM_NODES=str(nodes),
      SLURM_NNODES=str(nodes),
      SLURM_NTASKS=str(nodes * per_node),
      SLURM_NPROCS=str(nodes * per_node),
      SLURM_NTASKS_PER_NODE=str(per_node),
      SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})",
      SLURM_GPUS_PER_NODE=str(gpus_per_node),
      SLURM_GPUS_ON_NODE=str(gpus_per_node),
      CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus_per_node))),
      SLURM_NODEID="0",
      SLURMD_NODENAME="localhost",
  )
  env.pop("SLURM_GPUS_PER_TASK", None)
  return subprocess.run(
      ["bash", script] + list(args),
      cwd=submit_dir,
      env=env,
      timeout=600,
      capture_output=True,
      text=True,
  )


def _sbatch_tasks(tmp_path, **allocation):
  """The tasks the batch script starts (srun's tasks run a fake python that records them)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python").write_text(
      '#!/bin/bash\nd=$FAKE_TASKS/$SLURM_PROCID\nmkdir -p "$d"\nenv -0 >"$d/env"\n'
      'printf "%s\\0" "$@" >"$d/argv"\npwd >"$d/cwd"\n'
  )
  (bin_dir / "python").chmod(0o755)
  result = run_sbatch(
      ["--config=c.py", "--workdir=w"],
      submit_dir=tmp_path,
      bin_dir=bin_dir,
      env={"FAKE_TASKS": str(tmp_path / "tasks")},
      **allocation,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  tasks = []
  for i in range(len(os.listdir(tmp_path / "tasks"))):
    folder = tmp_path / "tasks" / str(i)
    env = dict(item.split("=", 1) for item in open(folder / "env").read().split("\0") if item)
    argv = open(folder / "argv").read().split("\0")[:-1]
    tasks.append((env, argv, open(folder / "cwd").read().strip()))
  return tasks


def test_slurm_sbatch_one_process_per_gpu(tmp_path):
  """sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sbatch ...: 8 tasks per node (the
  script's default), every task a distinct GPU of its node, no GPU idle."""
  tasks = _sbatch_tasks(tmp_path, nodes=2, gpus_per_node=8)
  assert len(tasks) == 16
  used = set()
  for i, (env, argv, cwd) in enumerate(tasks):
    assert argv == ["-m", "mmret.main", "--distributed=auto", "--config=c.py", "--workdir=w"]
    assert cwd == str(tmp_path)
    layout = runtime.slurm_layout(env)
    assert (layout.task, layout.tasks, layout.warnings) == (i, 16, ()), layout
    used |= {(layout.node_index, gpu) for gpu in layout.local_device_ids}
  assert used == {(node, gpu) for node in range(2) for gpu in range(8)}


def test_slurm_sbatch_one_process_per_node(tmp_path):
  """sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 ... --local_devices=all."""
  tasks = _sbatch_tasks(tmp_path, nodes=2, ntasks_per_node=1, gpus_per_node=8)
  assert len(tasks) == 2
  for env, _, _ in tasks:
    layout = runtime.slurm_layout(env, "all")
    assert (layout.local_device_ids, layout.warnings) == (list(range(8)), ())


# A fake gcloud: 'compute tpus tpu-vm scp' copies like scp into every worker's home (folders of
# FAKE_WORKERS), 'ssh --command' runs the command with bash in every worker's home, with the
# worker's tools (FAKE_WORKER_PATH) only. Every call is recorded in FAKE_GCLOUD_LOG.
FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
  log.write(json.dumps(args) + "\\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, rest = args[3], args[4:]
options, positional = {{}}, []
while rest:
  arg = rest.pop(0)
  if arg.startswith("--"):
    name, eq, value = arg[2:].partition("=")
    options[name] = value if eq or name == "recurse" else rest.pop(0)
  else:
    positional.append(arg)
assert options.get("worker") == "all" and "zone" in options, options
homes = os.environ["FAKE_WORKERS"].split(os.pathsep)
if verb == "scp":
  *sources, dest = positional
  target = dest.split(":", 1)[1]
  target = target[2:] if target.startswith("~/") else target
  for home in homes:
    path = os.path.join(home, target)
    for source in sources:
      into = os.path.join(path, os.path.basename(source)) if os.path.isdir(path) else path
      if os.path.isdir(source):
        assert "recurse" in options, "scp of a folder needs --recurse"
        shutil.copytree(source, into)
      else:
        shutil.copy(source, into)
else:
  assert verb == "ssh" and len(positional) == 1, args
  for worker, home in enumerate(homes):
    env = {{"HOME": home, "PATH": os.environ["FAKE_WORKER_PATH"], "TPU_WORKER_ID": str(worker)}}
    subprocess.run(["bash", "-c", options["command"]], cwd=home, env=env, check=True)
"""

# The workers' tools. uv: 'venv --python V DIR' makes a venv whose python records how it was run;
# 'pip install' records what it installs and where. python3 (the image's 3.10): 'pip install --user
# uv' installs this uv into ~/.local/bin. Calls are recorded in ~/calls.jsonl.
FAKE_TOOL = """#!{python}
import json, os, sys

tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
venv = os.environ.get("VIRTUAL_ENV")
home = os.environ["HOME"]
here = os.path.dirname(os.path.realpath(sys.argv[0]))  # where the fake tools are
call = {{"tool": tool, "args": args, "cwd": os.getcwd(), "venv": venv}}
if tool == "python" and os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0]))) == venv:
  call["python_version"] = open(os.path.join(venv, "version")).read()
with open(os.path.join(home, "calls.jsonl"), "a") as log:
  log.write(json.dumps(call) + "\\n")
if tool == "uv" and args[0] == "venv":
  path, version = args[-1], args[args.index("--python") + 1]
  os.makedirs(os.path.join(path, "bin"))
  open(os.path.join(path, "version"), "w").write(version)
  with open(os.path.join(path, "bin", "activate"), "w") as activate:
    activate.write(f'export VIRTUAL_ENV={{path}}\\nexport PATH="{{path}}/bin:$PATH"\\n')
  os.symlink(os.path.join(here, "fake_python"), os.path.join(path, "bin", "python"))
elif tool == "python3" and args[:3] == ["-m", "pip", "install"] and "uv" in args:
  os.makedirs(os.path.join(home, ".local", "bin"), exist_ok=True)
  os.symlink(os.path.join(here, "fake_uv"), os.path.join(home, ".local", "bin", "uv"))
"""


def _checkout(root):
  """A git checkout with the TPU launcher, committed code, new code, a deleted file and what must
  not travel: .git, a run folder, caches, a virtual environment."""
  files = {
      ".gitignore": "__pycache__/\n/runs/\n.venv/\n*.egg-info/\n",
      "setup.py": "# setup\n",
      "mmret/__init__.py": "",
      "configs/a b.py": "# a name with a space\n",
      "zz_old.py": "# deleted after the commit, the last file git lists\n",
  }
  for name, text in files.items():
    os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
    open(os.path.join(root, name), "w").write(text)
  os.makedirs(os.path.join(root, "launch"))
  shutil.copy(os.path.join(REPO, "launch", "tpu_pod.sh"), os.path.join(root, "launch"))
  git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(git + ["init", "-q"], check=True)
  subprocess.run(git + ["add", "-A"], check=True)
  subprocess.run(git + ["commit", "-qm", "code"], check=True)
  os.remove(os.path.join(root, "zz_old.py"))
  for name in [
      "mmret/new.py",
      "runs/exp/metrics.jsonl",
      "mmret/__pycache__/x.pyc",
      ".venv/bin/python",
      "mmret.egg-info/PKG-INFO",
  ]:
    os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
    open(os.path.join(root, name), "w").write("x\n")
  return root


def _tree(path):
  return sorted(
      os.path.relpath(os.path.join(folder, name), path)
      for folder, _, names in os.walk(path)
      for name in names
  )


def _fake_gcloud(tmp_path):
  """The environment that puts the fake gcloud first on PATH (calls in tmp_path/gcloud.jsonl)."""
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
  (tmp_path / "bin" / "gcloud").chmod(0o755)
  return dict(
      os.environ,
      PATH=os.pathsep.join([str(tmp_path / "bin"), os.environ["PATH"]]),
      FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"),
  )


def test_tpu_pod_launcher(tmp_path):
  checkout = _checkout(tmp_path / "checkout")
  env = _fake_gcloud(tmp_path)
  worker_bin = tmp_path / "worker_bin"
  worker_bin.mkdir()
  for tool in ["uv", "python", "python3"]:
    (tmp_path / f"fake_{tool}").write_text(FAKE_TOOL.format(python=sys.executable))
    (tmp_path / f"fake_{tool}").chmod(0o755)
  # The image's python3 and a python outside any venv (they record calls); uv only once installed.
  for tool in ["python", "python3"]:
    os.symlink(tmp_path / f"fake_{tool}", worker_bin / tool)
  for tool in ["bash", "sh", "mkdir", "tar", "gzip", "rm", "cat"]:
    os.symlink(shutil.which(tool), worker_bin / tool)
  homes = [tmp_path / "worker0", tmp_path / "worker1"]
  for home in homes:
    home.mkdir()
  env.update(FAKE_WORKERS=os.pathsep.join(map(str, homes)), FAKE_WORKER_PATH=str(worker_bin))
  command = ["python", "-m", "mmret.main", "--config=configs/a b.py", "--workdir=gs://b/run"]
  launcher = [str(checkout / "launch" / "tpu_pod.sh"), "pod", "us-central2-b", "proj", "--"]
  for _ in range(2):
    result = subprocess.run(launcher + command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
  gcloud = [json.loads(line) for line in open(tmp_path / "gcloud.jsonl")]
  assert [call[3] for call in gcloud] == ["scp", "ssh"] * 2
  assert all("--worker=all" in call and "proj" in call for call in gcloud), gcloud
  expected = [
      ".gitignore",
      "configs/a b.py",
      "launch/tpu_pod.sh",
      "mmret/__init__.py",
      "mmret/new.py",
      "setup.py",
  ]
  for home in homes:
    # The code once, in ~/mmret, after two launches; the archive is gone.
    assert _tree(home / "mmret") == expected
    assert sorted(os.listdir(home)) == [".local", "calls.jsonl", "mmret", "mmret-venv"]
    calls = [json.loads(line) for line in open(home / "calls.jsonl")]
    tools = [(call["tool"], call["args"][:2]) for call in calls]
    # uv installed once with the image's python3, the venv made once with Python 3.11.
    assert tools == [
        ("python3", ["-m", "pip"]),
        ("uv", ["venv", "-q"]),
        ("uv", ["pip", "install"]),
        ("python", ["-m", "mmret.main"]),
        ("uv", ["pip", "install"]),
        ("python", ["-m", "mmret.main"]),
    ]
    venv, code = str(home / "mmret-venv"), str(home / "mmret")
    assert calls[1]["args"][-3:] == ["--python", "3.11", venv]
    for install in calls[2], calls[4]:
      assert (install["venv"], install["cwd"]) == (venv, code)
      assert install["args"][-3:] == ["-e", ".[gcs]", "jax[tpu]"]
    for run in calls[3], calls[5]:
      assert (run["venv"], run["cwd"], run["python_version"]) == (venv, code, "3.11")
      assert run["args"] == command[1:] + ["--distributed=auto"]


def test_tpu_pod_launcher_arguments(tmp_path):
  launcher = os.path.join(REPO, "launch", "tpu_pod.sh")
  env = _fake_gcloud(tmp_path)
  for args in [["pod", "zone", "--"], ["pod", "zone", "proj", "python"]]:
    result = subprocess.run([launcher] + args, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and ("usage" in result.stderr or "missing --" in result.stderr)
  assert not os.path.exists(tmp_path / "gcloud.jsonl")


def test_local_launcher(tmp_path):
  """launch/local.sh gives each process its coordinator flags, fake devices and CPU platform."""
  launcher = os.path.join(REPO, "launch", "local.sh")
  for args in [["2", "--"], ["2", "4", "python"]]:
    result = subprocess.run([launcher] + args, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
  env = dict(os.environ, XLA_FLAGS="", MMRET_COORDINATOR_PORT="1234")
  env.pop("JAX_PLATFORMS", None)
  show = ["bash", "-c", 'echo "$XLA_FLAGS|$JAX_PLATFORMS|$*"', "sh", f"--workdir={tmp_path}"]
  result = subprocess.run(
      [launcher, "2", "4", "--"] + show, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr
  for i in range(2):
    assert open(tmp_path / f"proc{i}.log").read() == (
        f" --xla_force_host_platform_device_count=4|cpu|--workdir={tmp_path} "
        f"--coordinator_address=127.0.0.1:1234 --num_processes=2 --process_id={i}\n"
    )
