"""The launchers: launch/xm_launch.py (an xmanager experiment) and launch/tpu_vm.sh (TPU VMs).

References: what launch/gpu_host.sh runs (each stage's command line, recorded by a fake
`python`), what the commands printed by tpu_vm.sh's dry run do when a shell runs them, and the
objects xmanager itself builds from a plan. Nothing here needs docker, gcloud or a network.
"""

import asyncio
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest
from xmanager import xm
from xmanager import xm_mock
from xmanager.xm import utils as xm_utils
from xmanager.xm_local import executables as xm_local_executables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("xm_launch", f"{ROOT}/launch/xm_launch.py")
xm_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xm_launch)

BINDING = "--gin_bindings=stage2/RunConfig.steps = 7"
FAKE_PYTHON = """#!/bin/bash
printf '%s\\0' "$@" >> "$ARGV_LOG"; printf '\\n' >> "$ARGV_LOG"
"""


def fake_python(directory):
  """A `python` that appends its argv (NUL-separated, one line per call) to $ARGV_LOG."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "python")
  with open(path, "w") as f:
    f.write(FAKE_PYTHON)
  os.chmod(path, 0o755)
  return path


def read_calls(log):
  with open(log) as f:
    return [tuple(line.split("\0")[:-1]) for line in f.read().splitlines()]


def test_plan_runs_what_gpu_host_sh_runs(tmp_path):
  bin_dir, log = tmp_path / "bin", tmp_path / "argv"
  fake_python(bin_dir)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", ARGV_LOG=str(log))
  subprocess.run(["bash", f"{ROOT}/launch/gpu_host.sh", "/w", BINDING], env=env, check=True)
  plan = xm_launch.build_plan(workdir="/w", gin_bindings=[BINDING.split("=", 1)[1]])
  assert [j.name for j in plan.jobs] == ["stage1", "stage2", "eval"]
  assert [j.after for j in plan.jobs] == [None, "stage1", "stage2"]
  assert read_calls(log) == [("-m", j.module, *j.args) for j in plan.jobs]
  assert plan.jobs[1].args[2:] == ("--gin_file=models/smollm2_135m.gin",
                                   "--gin.WORKDIR='/w/stage2'", "--gin.STAGE1_WORKDIR='/w/stage1'",
                                   BINDING)
  assert plan.jobs[2].args[4] == "--gin.MODEL_WORKDIR='/w/stage2'"
  assert all(j.requirements == {} and j.env == {} for j in plan.jobs)
  assert plan.volumes == {"/w": "/w"} and plan.platform == "local"


def test_plan_options():
  plan = xm_launch.build_plan(
      platform="vertex", workdir="/gcs/b/run/", stages=["stage2", "eval"],
      task_gin="tasks/gsm8k.gin", model_gin="models/gemma3_1b.gin", gin_files=["my.gin"],
      accelerator="A100=8", env=["XLA_FLAGS=--x=1"], image_tag="gcr.io/p/score:1")
  assert [(j.name, j.after) for j in plan.jobs] == [("stage2", None), ("eval", "stage2")]
  assert plan.jobs[0].args == (
      "--gin_file=stage2.gin", "--gin_file=tasks/gsm8k.gin", "--gin_file=models/gemma3_1b.gin",
      "--gin_file=my.gin", "--gin.WORKDIR='/gcs/b/run/stage2'",
      "--gin.STAGE1_WORKDIR='/gcs/b/run/stage1'")
  assert plan.jobs[0].requirements == {"a100": "8"} and plan.jobs[1].env == {"XLA_FLAGS": "--x=1"}
  assert plan.volumes == {} and plan.image_tag == "gcr.io/p/score:1"
  assert any("'jax[cuda12]'" in line for line in plan.docker_instructions)
  tpu = xm_launch.build_plan(platform="kubernetes", workdir="/w", accelerator="tpu_v5e=2x4")
  assert any("'jax[tpu]'" in line for line in tpu.docker_instructions)
  assert ("  pods ask for google.com/tpu: 8 on nodes cloud.google.com/gke-tpu-accelerator="
          "tpu-v5-lite-podslice, cloud.google.com/gke-tpu-topology=2x4\n") in (
              xm_launch.format_plan(tpu))
  cpu = xm_launch.build_plan(workdir="/w", data_packages=[])
  assert not any("jax[" in line or "--no-deps" in line for line in cpu.docker_instructions)


@pytest.mark.parametrize("kwargs, message", [
    (dict(workdir="w"), "absolute path"),
    (dict(workdir="/w'x"), "without quotes"),
    (dict(workdir="/w", platform="borg"), "expected local, vertex or kubernetes"),
    (dict(workdir="/bucket/w", platform="vertex"), "mounted under /gcs/"),
    (dict(workdir="/w", stages=["eval", "stage1"]), "in order"),
    (dict(workdir="/w", stages=["sft"]), "in order"),
    (dict(workdir="/w", accelerator="a100"), "NAME=COUNT"),
    (dict(workdir="/w", accelerator="a100=8"), "local takes one of local_gpu"),
    (dict(workdir="/w", accelerator="local_gpu=two"), "number of GPUs"),
    (dict(workdir="/gcs/b", platform="vertex", accelerator="h100=8"), "vertex takes one of"),
    (dict(workdir="/gcs/b", platform="vertex", accelerator="tpu_v3=32"), "tpu_v3=8"),
    (dict(workdir="/w", platform="kubernetes", accelerator="tpu_v5e=8"), "topology"),
    (dict(workdir="/w", platform="kubernetes", accelerator="tpu_v5e=4x4"), "launch/tpu_vm.sh"),
    (dict(workdir="/w", platform="kubernetes", accelerator="tpu_v4=2x2x2"), "launch/tpu_vm.sh"),
    (dict(workdir="/w", env=["=1"]), "KEY=VALUE"),
])
def test_plan_errors(kwargs, message):
  with pytest.raises(xm_launch.PlanError, match=message):
    xm_launch.build_plan(**kwargs)


def test_dry_run_prints_the_default_experiment_offline(tmp_path):
  # No credentials (a bare HOME), and any socket the process would open raises.
  code = ("import runpy, socket, sys\n"
          "def refuse(*a, **k): raise OSError('network used in a dry run')\n"
          "socket.socket.connect = socket.socket.connect_ex = refuse\n"
          "socket.create_connection = socket.getaddrinfo = refuse\n"
          f"sys.argv = [{ROOT + '/launch/xm_launch.py'!r}, '--dry_run']\n"
          "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path)}
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert out.startswith("experiment 'score_jax': stage1 -> stage2 -> eval on local (dry run")
  plan = xm_launch.build_plan(workdir=f"{tmp_path}/workdirs/xm")
  assert "FROM python:3.11-slim" in out and f"volume: {tmp_path}/workdirs/xm ->" in out
  units = [l for l in out.splitlines() if l.startswith("work unit")]
  assert units == ["work unit 1/3: stage1 (first)",
                   "work unit 2/3: stage2 (after stage1 has completed)",
                   "work unit 3/3: eval (after stage2 has completed)"]
  commands = [l.split("command: ", 1)[1] for l in out.splitlines() if "command: " in l]
  assert [shlex.split(c) for c in commands] == [
      ["python", "-m", "score_jax.main", *j.args] for j in plan.jobs]
  assert commands[0].endswith("""--gin.WORKDIR="'""" + f"{tmp_path}/workdirs/xm/stage1'\"")
  assert out.count("requirements: none (CPU)") == 3


def test_dry_run_flag_errors_are_one_line():
  proc = subprocess.run([sys.executable, f"{ROOT}/launch/xm_launch.py", "--dry_run",
                         "--platform=vertex", "--workdir=/gcs/b", "--accelerator=tpu_v4=2x2x1"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr == ("error: --accelerator='tpu_v4=2x2x1': vertex takes one of t4, p4, p100, "
                         "v100, a100, l4_24th, tpu_v2, tpu_v3\n")


def test_local_launch_needs_docker(tmp_path):
  proc = subprocess.run([sys.executable, f"{ROOT}/launch/xm_launch.py", f"--workdir={tmp_path}/w"],
                        env=dict(os.environ, HOME=str(tmp_path),
                                 DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock"),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and not os.path.exists(tmp_path / "w")
  assert proc.stderr.endswith("error: --platform=local runs Docker: no Docker daemon answered\n")


@pytest.mark.parametrize("arg", ["plain", "", "--gin.WORKDIR='/w x'", "--gin_bindings=A.b = 'c'",
                                 "--f=a$b", 'it\'s "x"', "--x=`y`"])
def test_shell_word_round_trips(arg):
  assert shlex.split(xm_launch.shell_word(arg)) == [arg]


def test_xm_objects_from_plan(tmp_path):
  plan = xm_launch.build_plan(workdir="/w", accelerator="local_gpu=1", env=["A=1"])
  source = xm_launch.stage_sources(str(tmp_path))
  assert sorted(os.listdir(source)) == ["gin", "requirements.txt", "score_jax", "setup.py"]
  assert os.path.isfile(f"{source}/gin/models/smollm2_135m.gin")
  assert not any("__pycache__" in d for d, _, _ in os.walk(source))
  spec = xm_launch.executable_spec(plan, source)
  assert isinstance(spec, xm.PythonContainer) and spec.path == source
  assert spec.entrypoint == xm.ModuleName("score_jax.main") and spec.name == "score_jax"
  assert spec.base_image == "python:3.11-slim"
  assert spec.docker_instructions == list(plan.docker_instructions)
  executor = xm_launch.executor(plan, plan.jobs[0])
  assert executor.requirements.task_requirements[xm.ResourceType.LOCAL_GPU] == 1
  assert executor.docker_options.volumes == {"/w": "/w"}
  # The argv and environment xm_local hands to `docker run` for each job.
  image = xm_local_executables.LoadedContainerImage(name="score_jax", image_id="sha256:0")
  for job_spec in plan.jobs:
    job = xm_launch.xm_job(plan, job_spec, image)
    argv = xm.merge_args(image.args, job.args).to_list(xm_utils.ARGV_ESCAPER)
    assert argv == list(job_spec.args) and job.env_vars == {"A": "1"}
    assert job.name == job_spec.name


def test_run_adds_work_units_one_after_the_other(tmp_path, monkeypatch):
  events = []
  unit = xm_mock.MockExperimentUnit

  async def launch(self, job_group, args, identity):
    events.extend(f"start {name}" for name in job_group.jobs)
    self._launched_jobs.extend(job_group.jobs.values())

  async def wait(self):
    await asyncio.sleep(0.01)  # A running job: the next unit must not start meanwhile.
    events.append(f"done {self.work_unit_id}")

  monkeypatch.setattr(unit, "_launch_job_group", launch)
  monkeypatch.setattr(unit, "_wait_until_complete", wait)
  plan = xm_launch.build_plan(workdir="/w")
  experiment = xm_mock.MockExperiment()
  asyncio.run(xm_launch.run(experiment, plan, str(tmp_path)))
  assert events == ["start stage1", "done 1", "start stage2", "done 2", "start eval", "done 3"]
  assert [j.args.to_list(xm_utils.ARGV_ESCAPER) for j in experiment.launched_jobs] == [
      list(j.args) for j in plan.jobs]


@pytest.mark.slow  # Importing the Vertex AI and Kubernetes clients takes seconds.
def test_cloud_executors_and_gke_tpu_pods():
  from xmanager.cloud import kubernetes  # pylint: disable=g-import-not-at-top
  vertex = xm_launch.build_plan(platform="vertex", workdir="/gcs/b", accelerator="a100=8",
                                image_tag="gcr.io/p/i:1")
  assert xm_launch.executor_spec(vertex).push_image_tag == "gcr.io/p/i:1"
  executor = xm_launch.executor(vertex, vertex.jobs[0])
  assert type(executor).__name__ == "Vertex"
  assert executor.requirements.task_requirements[xm.ResourceType.A100] == 8
  gke = xm_launch.build_plan(platform="kubernetes", workdir="/w", accelerator="tpu_v5e=2x4")
  pod = xm_launch.executor(gke, gke.jobs[0])
  assert type(pod).__name__ == "Kubernetes"
  assert "google.com/tpu" not in kubernetes.requirements_from_executor(pod).limits
  assert kubernetes.node_selector_from_executor(pod) == {}
  xm_launch.schedule_on_gke_tpus()
  xm_launch.schedule_on_gke_tpus()  # Idempotent.
  assert kubernetes.requirements_from_executor(pod).limits == {"google.com/tpu": "8"}
  assert kubernetes.node_selector_from_executor(pod) == {
      "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
      "cloud.google.com/gke-tpu-topology": "2x4"}
  gpu = xm_launch.build_plan(platform="kubernetes", workdir="/w", accelerator="t4=2")
  gpu_pod = xm_launch.executor(gpu, gpu.jobs[0])
  assert kubernetes.requirements_from_executor(gpu_pod).limits == {"nvidia.com/gpu": "2"}
  assert kubernetes.node_selector_from_executor(gpu_pod) == {
      "cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}


# ---- launch/tpu_vm.sh ----


def tpu_vm(tmp_path, *args, dry_run=True, **env):
  """Runs tpu_vm.sh with a PATH holding no programs at all (a dry run needs only bash)."""
  empty = tmp_path / "empty_path"
  empty.mkdir(exist_ok=True)
  env = {"PATH": str(empty), "ZONE": "us-central2-b", "TMPDIR": "/tmp", **env}
  if dry_run:
    env["DRY_RUN"] = "1"
  return subprocess.run(["/bin/bash", f"{ROOT}/launch/tpu_vm.sh", *args], env=env,
                        capture_output=True, text=True, timeout=30)


def remote_command(line):
  """The --command of a printed `gcloud ... ssh` line, as the worker's shell splits it."""
  [command] = [w for w in shlex.split(line) if w.startswith("--command=")]
  return command[len("--command="):]


def test_tpu_vm_create_installs_on_every_worker(tmp_path):
  proc = tpu_vm(tmp_path, "create", "pod", ACCELERATOR_TYPE="v4-32", PROJECT="proj")
  assert proc.returncode == 0, proc.stderr
  create, tar, scp, ssh = [shlex.split(l) for l in proc.stdout.splitlines()]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod",
                    "--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base"]
  assert tar[:4] == ["tar", "-czf", "/tmp/score_jax-pod.tar.gz", "-C"] and tar[4] == ROOT
  assert tar[-5:] == ["setup.py", "requirements.txt", "score_jax", "gin", "launch"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/score_jax-pod.tar.gz",
                 "pod:score_jax.tar.gz", "--zone=us-central2-b", "--project=proj", "--worker=all"]
  assert ssh[4:6] == ["ssh", "pod"] and "--worker=all" in ssh
  install = shlex.split(remote_command(proc.stdout.splitlines()[3]))
  assert "-e" in install and "jax[tpu]" in install and "python3.11" in install
  v5e = tpu_vm(tmp_path, "--dry_run", "create", "pod", DRY_RUN="0")
  assert "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite" in v5e.stdout


def test_tpu_vm_run_and_pipeline_execute_the_same_command_on_all_workers(tmp_path):
  args = ["--gin_file=stage1.gin", "--gin.WORKDIR='/mnt/shared/s1'",
          "--gin_bindings=RunConfig.steps = 3"]
  run = tpu_vm(tmp_path, "run", "pod", *args)
  pipeline = tpu_vm(tmp_path, "pipeline", "pod", "/mnt/shared", BINDING,
                    MODEL="models/gemma3_1b.gin")
  for proc in run, pipeline:
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    assert shlex.split(line)[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod",
                                     "--zone=us-central2-b"] and "--worker=all" in line
  assert "python -m score_jax.main --distributed" in run.stdout
  # What a worker does with each command: run it in a home that has the installed layout.
  home = tmp_path / "home"
  fake_python(home / "score_jax" / ".venv" / "bin")
  os.symlink(f"{ROOT}/launch", home / "score_jax" / "launch")
  log = tmp_path / "argv"
  for proc in run, pipeline:
    command = remote_command(proc.stdout)
    subprocess.run(["bash", "-c", command], check=True,
                   env=dict(os.environ, HOME=str(home), ARGV_LOG=str(log)))
  calls = read_calls(log)
  assert calls[0] == ("-m", "score_jax.main", "--distributed", *args)
  plan = xm_launch.build_plan(workdir="/mnt/shared", model_gin="models/gemma3_1b.gin",
                              gin_bindings=[BINDING.split("=", 1)[1]])
  assert calls[1:] == [("-m", "score_jax.main", *j.args[:-1], "--distributed", j.args[-1])
                       for j in plan.jobs]


def test_tpu_vm_delete_and_errors(tmp_path):
  delete = tpu_vm(tmp_path, "delete", "pod")
  assert delete.stdout == "gcloud compute tpus tpu-vm delete pod --zone=us-central2-b --quiet\n"
  no_gcloud = tpu_vm(tmp_path, "delete", "pod", dry_run=False)
  assert no_gcloud.returncode == 2 and "error: gcloud not found" in no_gcloud.stderr
  no_zone = tpu_vm(tmp_path, "delete", "pod", ZONE="")
  assert no_zone.returncode != 0 and "set ZONE" in no_zone.stderr
  bad = tpu_vm(tmp_path, "resize", "pod")
  assert bad.returncode == 2 and "usage:" in bad.stderr and not bad.stdout


def test_multihost_sh(tmp_path):
  bin_dir, log = tmp_path / "bin", tmp_path / "argv"
  fake_python(bin_dir)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", ARGV_LOG=str(log))
  script = f"{ROOT}/launch/multihost.sh"
  subprocess.run(["bash", script, "stage1.gin", "/w/s1", BINDING], env=env, check=True)
  subprocess.run(["bash", script, "eval.gin", "/w/e"], check=True,
                 env=dict(env, COORDINATOR="10.0.0.2:1234", NUM_PROCESSES="2", PROCESS_ID="1"))
  assert read_calls(log) == [
      ("-m", "score_jax.main", "--distributed", "--gin_file=stage1.gin", "--gin.WORKDIR='/w/s1'",
       BINDING),
      ("-m", "score_jax.main", "--distributed", "--coordinator_address=10.0.0.2:1234",
       "--num_processes=2", "--process_id=1", "--gin_file=eval.gin", "--gin.WORKDIR='/w/e'")]
