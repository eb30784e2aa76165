"""Experiments: the modes of `python -m score_jax.main`, configured by gin.

  sft        train the base model on the task's transcripts (the toy demo's base model)
  stage1     SCoRe Stage I from `experiment.init_from` (reference: `experiment.reference_from`)
  stage2     SCoRe Stage II from Stage I's export (reference: the base model); without a Stage I
             work dir only when `experiment.without_stage1` says so (the paper's ablation)
  multi_turn, single_turn   the paper's ablations / baselines
  eval       greedy multi-attempt evaluation of `experiment.init_from`
  pipeline   [sft ->] stage1 -> stage2 -> eval(base, stage1, stage2) and the Table 2 shaped
             summary, each under its own sub-directory of the work dir; then report.md with
             the table, training curves and edit-ratio histograms (report.py). The sft base
             is trained for the toy model only: a pretrained model is its own base.

Each mode reads its gin bindings in a scope named after it, so one config can hold
`sft/RunConfig.steps = 600` and `stage2/RunConfig.steps = 200` side by side.

Bad input fails before anything is trained: `missing_settings` lists what the config lacks,
the task's data is read and every prompt is measured against `RunConfig.max_prompt_len` before
the model is loaded or compiled, and errors of reading files become one-line `UserError`s.
"""

import dataclasses
import os
import tempfile
from typing import Any, Callable, Optional, Sequence, Union

import gin
import jax

from score_jax import evaluation
from score_jax import model as model_lib
from score_jax import objectives
from score_jax import partitioning
from score_jax import report
from score_jax import rollout as rollout_lib
from score_jax import tasks
from score_jax import toy
from score_jax import trainer
from score_jax import vocab as vocab_lib

UserError = trainer.UserError
MODES = ("sft", *objectives.KINDS, "eval", "pipeline")

# A task as gin gives it: the task, or the factory that makes it (`@tasks.make_task`, no
# parentheses), so that errors of reading its files are raised here and reported in one line.
TaskOrFactory = Union[tasks.Task, Callable[[], tasks.Task]]


@gin.configurable
def policy_source(model: Optional[str] = None, chat_format: str = "auto") -> tuple[str, str]:
  """Where the starting model comes from when no `init_from` is given.

  model: "toy" (a small random model over the toy task's characters, `toy.model_config`),
    or any source `loading.load` accepts (a shipped name, a GGUF file, a HF directory); set by
    the model files (gin/models/*.gin) and by tasks/toy.gin.
  chat_format: conversation format of real models: "gemma", "chatml", "plain" (see chat.py)
    or "auto": the GGUF's own chat template where it has one, else "plain".
  """
  return model, chat_format


def make_task(task: TaskOrFactory, setting: str) -> tasks.Task:
  """The task, built here if gin gave its factory; file errors as one line naming `setting`."""
  if isinstance(task, tasks.Task):
    return task
  try:
    return task()
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"cannot make the task ({setting}): {trainer.first_line(e)}") from None


def task_examples(task: tasks.Task, split: str) -> Sequence[tasks.Example]:
  """`task.examples(split)`; a missing or malformed data file as one line."""
  try:
    return task.examples(split)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"cannot read split {split!r} of task {task.name!r}: "
                    f"{trainer.first_line(e)}") from None


def _conversation(task: tasks.Task, vocab: vocab_lib.Vocabulary, chat_format: str,
                  source: str) -> rollout_lib.Conversation:
  """The conversation format: the toy's own, or `loading.chat_format(chat_format, source)`."""
  if isinstance(task, toy.ToyArithmetic):
    return rollout_lib.Conversation(task, vocab, toy.FORMAT)
  from score_jax import loading  # pylint: disable=g-import-not-at-top
  try:
    return rollout_lib.Conversation(task, vocab, loading.chat_format(chat_format, source))
  except ValueError as e:
    raise UserError(str(e)) from None


def load_policy(task: tasks.Task, path: Optional[str], seed: int = 0) -> trainer.Policy:
  """The policy exported under work dir `path` (its `export/`), or a fresh one."""
  source, chat_format = policy_source()
  from score_jax import loading  # pylint: disable=g-import-not-at-top
  if path is not None:
    export = os.path.join(path, "export")
    if not os.path.isfile(os.path.join(export, "model_config.json")):
      raise UserError(f"no exported model in {path!r} (expected {export}/): run the "
                      "previous stage first, or fix experiment.init_from")
    try:
      model_cfg, params, vocab = loading.load(export)
      spec = loading.export_vocab_spec(export)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot read the exported model in {export}: "
                      f"{trainer.first_line(e)}") from None
  elif source == "toy":
    if not isinstance(task, toy.ToyArithmetic):
      raise UserError("policy_source.model = 'toy' only works with the toy task")
    vocab = task.vocab
    model_cfg = toy.model_config(vocab.vocab_size)
    params = model_lib.init_params(model_cfg, jax.random.PRNGKey(seed))
    spec = {"kind": "char", "alphabet": toy.ALPHABET}
  else:
    try:
      model_cfg, params, vocab = loading.load(source)
    except (OSError, ValueError) as e:
      raise UserError(f"cannot load the model {source!r} (policy_source.model): "
                      f"{trainer.first_line(e)}") from None
    spec = {"kind": "source", "source": source}
  conv = _conversation(task, vocab, chat_format, spec.get("source", source))
  return trainer.Policy(model_cfg, params, conv, spec)


@gin.configurable
def eval_config(num_problems: Optional[int] = None, batch_size: int = 250,
                num_attempts: int = 2, split: str = "test",
                task: Optional[TaskOrFactory] = None) -> dict[str, Any]:
  """Evaluation settings: the first `num_problems` of `split` (all when None), of `task` when
  given (e.g. train on MBPP, evaluate on HumanEval), else of the experiment's task."""
  return dict(num_problems=num_problems, batch_size=batch_size, num_attempts=num_attempts,
              split=split, task=task)


def eval_problems(task: tasks.Task) -> tuple[tasks.Task, Sequence[tasks.Example]]:
  """The evaluation task (eval_config.task, else `task`) and its problems, read up front."""
  cfg = eval_config()
  if cfg["task"] is not None:
    task = make_task(cfg["task"], "eval_config.task")
  return task, task_examples(task, cfg["split"])[:cfg["num_problems"]]


def run_eval(workdir: str, task: tasks.Task, examples: Sequence[tasks.Example],
             policy: trainer.Policy) -> dict[str, float]:
  """Evaluates `policy` on `examples` of `task` (from `eval_problems`); writes the results."""
  cfg = eval_config()
  run_cfg = trainer.RunConfig()
  if policy.conv.task is not task:
    policy = dataclasses.replace(policy, conv=dataclasses.replace(policy.conv, task=task))
  trainer.check_prompt_lengths(policy.conv, examples, run_cfg.max_prompt_len)
  # On the training mesh: parameters sharded by the logical-axis rules, problems split over
  # the hosts (evaluation.evaluate).
  mesh, rules = partitioning.make_mesh(partitioning.mesh_shape()), partitioning.axis_rules()
  params = jax.device_put(policy.params,
                          partitioning.model_param_shardings(policy.model_cfg, mesh, rules))
  with partitioning.with_mesh_and_rules(mesh, rules):
    sampler = policy.conv.make_sampler(policy.model_cfg, num_attempts=cfg["num_attempts"],
                                       max_new_tokens=run_cfg.max_new_tokens,
                                       max_prompt_len=run_cfg.max_prompt_len, mesh=mesh)
    with trainer.make_pool(run_cfg.reward_workers) as pool:
      metrics, samples = evaluation.evaluate(policy.conv, sampler, params, task, examples, pool,
                                             batch_size=cfg["batch_size"])
  if jax.process_index() == 0:  # Every process holds all the results (see evaluate).
    evaluation.write_results(workdir, metrics, samples)
  print(evaluation.markdown_table({os.path.basename(workdir.rstrip("/")): metrics}))
  return metrics


def run_mode(mode: str, workdir: str, task: tasks.Task, init_from: Optional[str],
             reference_from: Optional[str]) -> trainer.Policy:
  """One mode, with gin scope `mode` (so `stage1/RunConfig.steps = ...` applies)."""
  with gin.config_scope(mode):
    run_cfg = trainer.RunConfig()
    if mode == "eval":
      eval_task, examples = eval_problems(task)  # Read before the model is loaded.
      policy = load_policy(eval_task, init_from, run_cfg.seed)
      run_eval(workdir, eval_task, examples, policy)
      return policy
    task_examples(task, "train")
    policy = load_policy(task, init_from, run_cfg.seed)
    ref_params, objective = None, None
    if mode != "sft":  # The KL reference: the base model.
      if reference_from is None and policy_source()[0] == "toy":
        raise UserError("the toy model's base is an sft work dir: set "
                        "experiment.reference_from to it")
      if reference_from is None and init_from is None:
        ref_params = policy.params
      else:
        ref_params = load_policy(task, reference_from).params
      objective = objectives.objective(kind=mode)
    return trainer.train(mode, workdir, task, policy, ref_params, run_cfg, objective,
                         mesh=partitioning.make_mesh(partitioning.mesh_shape()),
                         rules=partitioning.axis_rules())


_UNBOUND = object()


def _query(selector: str) -> Any:
  """`gin.query_parameter`, or _UNBOUND for an unbound parameter or an undefined macro."""
  try:
    return gin.query_parameter(selector)
  except ValueError:
    return _UNBOUND


def _macro_name(value: Any) -> Optional[str]:
  """"X" when `value` is the reference %X, else None."""
  if isinstance(value, gin.config.ConfigurableReference) and value.configurable.name == "macro":
    return value.scoped_selector.split("/")[0]
  return None


def _setting_name(selector: str) -> str:
  """The macro a parameter is bound to (e.g. "STAGE1_WORKDIR"), else the parameter itself."""
  name, value = selector, _query(selector)
  while _macro_name(value):
    name = _macro_name(value)
    value = _query("%" + name)
  return name


def _bound_value(selector: str) -> Any:
  """The value bound to a parameter, following macros; None when unbound or undefined."""
  value = _query(selector)
  while _macro_name(value):
    value = _query("%" + _macro_name(value))
  return None if value is _UNBOUND else value


def missing_settings() -> list[str]:
  """What the parsed gin config lacks to run its mode, without running anything.

  Returns names a user sets: "mode" (a mode file), "task" (a task file), "model" (a model
  file), or the macro (else the parameter) of a required path, e.g. "WORKDIR".
  """
  missing = []
  mode = _bound_value("experiment.mode")
  if mode is None:
    missing.append("mode")
  if _bound_value("experiment.task") is None:
    missing.append("task")
  model = _bound_value("policy_source.model")
  init_from = _bound_value("experiment.init_from")
  reference_from = _bound_value("experiment.reference_from")
  trains = mode in objectives.KINDS
  if model is None and (mode == "pipeline" or init_from is None or
                        (trains and reference_from is None)):
    missing.append("model")  # The base model's weights are needed.
  if _bound_value("experiment.workdir") is None:
    missing.append(_setting_name("experiment.workdir"))
  if mode == "stage2" and init_from is None and not _bound_value("experiment.without_stage1"):
    missing.append(_setting_name("experiment.init_from"))
  if model == "toy":  # The toy's base model is an sft run.
    if trains and reference_from is None:
      missing.append(_setting_name("experiment.reference_from"))
    if mode == "eval" and init_from is None:
      missing.append(_setting_name("experiment.init_from"))
  return missing


def _check_writable(workdir: str) -> None:
  """Creates `workdir` and writes a file in it; one line naming it when that fails."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise UserError(f"the work dir {workdir!r} (WORKDIR) is not writable: "
                    f"{e.strerror or trainer.first_line(e)}") from None


@gin.configurable
def experiment(mode: str = gin.REQUIRED, workdir: str = gin.REQUIRED,
               task: TaskOrFactory = gin.REQUIRED, init_from: Optional[str] = None,
               reference_from: Optional[str] = None, without_stage1: bool = False) -> Any:
  """Runs `mode` (see the module docstring) in `workdir`.

  without_stage1: stage2 starts from the base model (`reference_from`, or the model file's
    weights) instead of a Stage I export: the paper's "without Stage I" ablation.
  """
  if mode not in MODES:
    raise UserError(f"unknown mode {mode!r} (experiment.mode); use one of {', '.join(MODES)}")
  if mode == "stage2" and without_stage1:
    if init_from is not None:
      raise UserError(f"stage2 with both a Stage I work dir ({init_from!r}) and "
                      "experiment.without_stage1 = True: choose one")
    init_from = reference_from
  task = make_task(task, "experiment.task")
  _check_writable(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.gin"), "w") as f:
      f.write(gin.config_str())
  if mode != "pipeline":
    return run_mode(mode, workdir, task, init_from, reference_from)
  return pipeline(workdir, task)


def pipeline(workdir: str, task: tasks.Task) -> dict[str, dict[str, float]]:
  """[sft ->] stage1 -> stage2 -> eval(base, stage1, stage2); the Table 2 summary."""
  d = lambda name: os.path.join(workdir, name)
  with gin.config_scope("eval"):
    eval_task, examples = eval_problems(task)  # Read before anything is trained.
  base = None  # A pretrained model: the policy source itself.
  if policy_source()[0] == "toy":
    base = d("base")
    run_mode("sft", base, task, None, None)
  run_mode("stage1", d("stage1"), task, base, base)
  run_mode("stage2", d("stage2"), task, d("stage1"), base)
  rows = {}
  with gin.config_scope("eval"):
    for name, src in (("base model", base), ("Stage I only", d("stage1")),
                      ("SCoRe", d("stage2"))):
      out = d("eval_" + os.path.basename(src or "base"))
      rows[name] = run_eval(out, eval_task, examples, load_policy(eval_task, src))
  table = evaluation.markdown_table(rows)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table + "\n")
  print("\n" + table)
  if jax.process_index() == 0:  # Only process 0 wrote metrics and results.
    print("report:", report.write_report([workdir], workdir))
  return rows
