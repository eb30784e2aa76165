"""Experiments: the modes of `python -m score_jax.main`, configured by gin.

  sft        train the base model on the task's transcripts (the toy demo's base model)
  stage1     SCoRe Stage I from `experiment.init_from` (reference: `experiment.reference_from`)
  stage2     SCoRe Stage II from Stage I's export (reference: the base model); without a Stage I
             work dir only when `experiment.without_stage1` says so (the paper's ablation)
  multi_turn, single_turn   the paper's ablations / baselines (RL objectives of objectives.py)
  star       STaR: SFT on the start model's two-attempt samples whose final attempt is right
  pair_sft   Pair-SFT: SFT on (wrong attempt, correct attempt) pairs of the base model
  stage2_star  Stage II with STaR (filter + SFT on the policy's own samples) for REINFORCE
  eval       greedy multi-attempt evaluation of `experiment.init_from` (eval_config)
  self_refine  the prompting baseline: eval of the base model asked to correct itself
  inference_scaling  majority vote of K samples vs of K/2 samples corrected once (scaling.py)
  pipeline   [sft ->] stage1 -> stage2 -> eval(base, stage1, stage2) and the Table 2 shaped
             summary, each under its own sub-directory of the work dir; then report.md with
             the table, training curves and edit-ratio histograms (report.py). The sft base
             is trained for the toy model only: a pretrained model is its own base.
  ablations  every row of the paper's Tables 2 and 4 over several seeds (ablations.py)

Training modes are the objects of modes.py (`make_mode`; options: `mode_options`); the
trainer runs them all with one loop. Each mode reads its gin bindings in a scope named after
it, so one config can hold `sft/RunConfig.steps = 600` and `stage2/RunConfig.steps = 200`
side by side.

Bad input fails before anything is trained: `missing_settings` lists what the config lacks,
the task's data is read and every prompt is measured against `RunConfig.max_prompt_len` before
the model is loaded or compiled, and errors of reading files become one-line `UserError`s.
"""

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np

from score_jax import checkpoints
from score_jax import partitioning
from score_jax.data import tasks
from score_jax.data import toy
from score_jax.decoding import sampling
from score_jax.eval import evaluation
from score_jax.eval import report
from score_jax.eval import scaling
from score_jax.models import transformer as model_lib
from score_jax.models import vocab as vocab_lib
from score_jax.rl import modes
from score_jax.rl import objectives
from score_jax.rl import rollout as rollout_lib
from score_jax.rl import trainer

UserError = trainer.UserError
TRAINING_MODES = ("sft", *objectives.KINDS, "star", "pair_sft", "stage2_star")
EVAL_MODES = ("eval", "self_refine", "inference_scaling")
MODES = (*TRAINING_MODES, *EVAL_MODES, "pipeline", "ablations")
# Modes that start from a Stage I export (or the base, with `experiment.without_stage1`).
AFTER_STAGE1 = ("stage2", "stage2_star")

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
  from score_jax.models import loading  # pylint: disable=g-import-not-at-top
  try:
    return rollout_lib.Conversation(task, vocab, loading.chat_format(chat_format, source))
  except ValueError as e:
    raise UserError(str(e)) from None


def load_policy(task: tasks.Task, path: Optional[str], seed: int = 0) -> trainer.Policy:
  """The policy exported under work dir `path` (its `export/`), or a fresh one."""
  source, chat_format = policy_source()
  from score_jax.models import loading  # pylint: disable=g-import-not-at-top
  if path is not None:
    export = checkpoints.resolve(path) / "export"
    if not (export / "model_config.json").is_file():
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
  model_cfg = model_settings(model_cfg)
  params = jax.tree.map(lambda w: np.asarray(w, model_cfg.param_dtype), params)
  return trainer.Policy(model_cfg, params, conv, spec)


@gin.configurable
def model_settings(model_cfg: model_lib.ModelConfig, dtype: Optional[str] = None,
                   param_dtype: Optional[str] = None, remat: Optional[str] = None
                   ) -> model_lib.ModelConfig:
  """How the loaded model computes (gin; None keeps what the weights came with, float32):
  `dtype` of activations and matmuls ("bfloat16" on accelerators), `param_dtype` of the
  trained (master) parameters and optimizer moments, `remat` of each layer in the backward
  pass ("none", "full", "save_dots"; see model.REMAT_POLICIES)."""
  changes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype), ("remat", remat))
             if v is not None}
  for key in ("dtype", "param_dtype"):
    if key in changes:
      changes[key] = getattr(jnp, jnp.dtype(changes[key]).name)
  if changes.get("remat", "none") not in model_lib.REMAT_POLICIES:
    raise UserError(f"model_settings.remat must be one of {sorted(model_lib.REMAT_POLICIES)}, "
                    f"got {changes['remat']!r}")
  return dataclasses.replace(model_cfg, **changes)


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


def evaluate_policy(task: tasks.Task, examples: Sequence[tasks.Example],
                    policy: trainer.Policy, num_attempts: int,
                    method: Optional[sampling.Method] = None) -> tuple[dict, list[dict]]:
  """`evaluation.evaluate` of `policy` on `examples` of `task` (greedy unless `method`)."""
  cfg, run_cfg = eval_config(), trainer.RunConfig()
  if policy.conv.task is not task:
    policy = dataclasses.replace(policy, conv=dataclasses.replace(policy.conv, task=task))
  trainer.check_prompt_lengths(policy.conv, examples, run_cfg.max_prompt_len)
  # On the training mesh: parameters sharded by the logical-axis rules, problems split over
  # the hosts (evaluation.evaluate).
  mesh, rules = partitioning.make_mesh(partitioning.mesh_shape()), partitioning.axis_rules()
  params = jax.device_put(policy.params,
                          partitioning.model_param_shardings(policy.model_cfg, mesh, rules))
  with partitioning.with_mesh_and_rules(mesh, rules):
    sampler = policy.conv.make_sampler(policy.model_cfg, num_attempts=num_attempts,
                                       max_new_tokens=run_cfg.max_new_tokens,
                                       max_prompt_len=run_cfg.max_prompt_len, mesh=mesh,
                                       **trainer.sampler_options(run_cfg))
    with trainer.make_pool(run_cfg.reward_workers) as pool:
      return evaluation.evaluate(policy.conv, sampler, params, task, examples, pool,
                                 batch_size=cfg["batch_size"],
                                 rng=jax.random.PRNGKey(run_cfg.seed), method=method)


def run_eval(workdir: str, task: tasks.Task, examples: Sequence[tasks.Example],
             policy: trainer.Policy) -> dict[str, float]:
  """Evaluates `policy` on `examples` of `task` (from `eval_problems`); writes the results."""
  metrics, samples = evaluate_policy(task, examples, policy, eval_config()["num_attempts"])
  if jax.process_index() == 0:  # Every process holds all the results (see evaluate).
    evaluation.write_results(workdir, metrics, samples)
  print(evaluation.markdown_table({os.path.basename(workdir.rstrip("/")): metrics}))
  if "acc_t3" in metrics:
    print(evaluation.turn_table(metrics))
  return metrics


@gin.configurable
def scaling_config(budgets: Sequence[int] = (2, 4, 8, 16, 32),
                   temperature: float = 0.7) -> dict[str, Any]:
  """Settings of the inference_scaling mode (attempt budgets per problem, temperature)."""
  try:
    scaling.check_budgets(budgets)
  except ValueError as e:
    raise UserError(f"scaling_config: {e}") from None
  return dict(budgets=list(budgets), temperature=temperature)


def run_inference_scaling(workdir: str, task: tasks.Task, examples: Sequence[tasks.Example],
                          policy: trainer.Policy) -> dict[str, Any]:
  """The inference_scaling mode (scaling.py): max(budgets) two-attempt samples per problem at
  `scaling_config.temperature`; results.json and table.md in `workdir`."""
  cfg = scaling_config()
  m = max(cfg["budgets"])
  repeated = [e for e in examples for _ in range(m)]
  metrics, samples = evaluate_policy(task, repeated, policy, 2,
                                     sampling.Sampling(cfg["temperature"]))
  answers = [[[task.final_answer(t) for t in s["attempts"]] for s in samples[i:i + m]]
             for i in range(0, len(samples), m)]
  rewards = np.array([s["rewards"] for s in samples], np.float32).reshape(len(examples), m, 2)
  curves = scaling.scaling_curves(answers, rewards, cfg["budgets"])
  if jax.process_index() == 0:
    table = scaling.write(workdir, curves, {"n": len(examples), **cfg,
                                            "one_sample": metrics})
    print(table)
  return curves


@gin.configurable
def mode_options(offline_fraction: float = 0.0, star_online: Optional[bool] = None,
                 star_only_corrections: bool = False,
                 pair_reference_solution: bool = True) -> dict[str, Any]:
  """Options of the training modes (modes.py), per mode scope (e.g. `stage2/mode_options...`).

  offline_fraction: RL modes: the fraction of each batch's prompts whose attempt 1 the base
    model writes (offline prompts); the policy writes attempt 2.
  star_online: STaR samples with the latest policy (True) or the frozen start model (False);
    None: False for star (the paper's baseline), True for stage2_star.
  star_only_corrections: STaR keeps only traces whose first attempt is wrong.
  pair_reference_solution: Pair-SFT uses the task's reference solution when no sample of a
    problem is correct (the toy has one).
  """
  return dict(offline_fraction=offline_fraction, star_online=star_online,
              star_only_corrections=star_only_corrections,
              pair_reference_solution=pair_reference_solution)


def make_mode(mode: str) -> Any:
  """The modes.py object of training mode `mode` (read in its gin scope)."""
  opts = mode_options()
  online = opts["star_online"]
  factories = {
      "sft": modes.SFT,
      "star": lambda: modes.STaR("star", bool(online), opts["star_only_corrections"]),
      "stage2_star": lambda: modes.STaR("stage2_star", online is not False,
                                        opts["star_only_corrections"]),
      "pair_sft": lambda: modes.PairSFT(use_reference_solution=opts["pair_reference_solution"]),
  }
  if mode in factories:
    return factories[mode]()
  return modes.RL(objectives.objective(kind=mode), opts["offline_fraction"])


def run_mode(mode: str, workdir: str, task: tasks.Task, init_from: Optional[str],
             reference_from: Optional[str], **run_overrides: Any) -> Any:
  """One mode, with gin scope `mode` (so `stage1/RunConfig.steps = ...` applies);
  `run_overrides` replace fields of its RunConfig (e.g. steps, learning_rate, seed)."""
  with gin.config_scope(mode):
    run_cfg = dataclasses.replace(trainer.RunConfig(), **run_overrides)
    if mode in EVAL_MODES:
      eval_task, examples = eval_problems(task)  # Read before the model is loaded.
      policy = load_policy(eval_task, init_from, run_cfg.seed)
      run = run_inference_scaling if mode == "inference_scaling" else run_eval
      return run(workdir, eval_task, examples, policy)
    task_examples(task, "train")
    train_mode = make_mode(mode)
    policy = load_policy(task, init_from, run_cfg.seed)
    ref_params = None
    if mode != "sft":  # The KL reference / the model sampled from: the base model.
      if reference_from is None and policy_source()[0] == "toy":
        raise UserError("the toy model's base is an sft work dir: set "
                        "experiment.reference_from to it")
      if reference_from is None and init_from is None:
        ref_params = policy.params
      else:
        ref_params = load_policy(task, reference_from).params
      # Frozen: only ever computed with, so its matrices are kept in the compute dtype.
      ref_params = jax.tree.map(
          lambda w: np.asarray(w, policy.model_cfg.dtype) if w.ndim > 1 else w, ref_params)
    return trainer.train(train_mode, workdir, task, policy, ref_params, run_cfg,
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
  trains = mode in TRAINING_MODES and mode != "sft"
  if model is None and (mode in ("pipeline", "ablations") or init_from is None or
                        (trains and reference_from is None)):
    missing.append("model")  # The base model's weights are needed.
  if _bound_value("experiment.workdir") is None:
    missing.append(_setting_name("experiment.workdir"))
  without_stage1 = _bound_value("experiment.without_stage1")
  if mode in AFTER_STAGE1 and init_from is None and not without_stage1:
    missing.append(_setting_name("experiment.init_from"))
  if model == "toy":  # The toy's base model is an sft run.
    if trains and reference_from is None:
      missing.append(_setting_name("experiment.reference_from"))
    if mode in EVAL_MODES and init_from is None:
      missing.append(_setting_name("experiment.init_from"))
  return missing


def _check_writable(workdir: str) -> None:
  """Creates `workdir` and writes a file in it; one line naming it when that fails."""
  probe = checkpoints.resolve(workdir) / f".writable.{os.getpid()}.{jax.process_index()}"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"the work dir {workdir!r} (WORKDIR) is not writable: "
                    f"{e.strerror or trainer.first_line(e)}") from None


@gin.configurable
def experiment(mode: str = gin.REQUIRED, workdir: str = gin.REQUIRED,
               task: TaskOrFactory = gin.REQUIRED, init_from: Optional[str] = None,
               reference_from: Optional[str] = None, without_stage1: bool = False) -> Any:
  """Runs `mode` (see the module docstring) in `workdir`.

  without_stage1: stage2 (and stage2_star) starts from the base model (`reference_from`, or
    the model file's weights) instead of a Stage I export: the paper's "without Stage I"
    ablation.
  """
  if mode not in MODES:
    raise UserError(f"unknown mode {mode!r} (experiment.mode); use one of {', '.join(MODES)}")
  if mode in AFTER_STAGE1 and without_stage1:
    if init_from is not None:
      raise UserError(f"{mode} with both a Stage I work dir ({init_from!r}) and "
                      "experiment.without_stage1 = True: choose one")
    init_from = reference_from
  task = make_task(task, "experiment.task")
  _check_writable(workdir)
  if jax.process_index() == 0:
    (checkpoints.resolve(workdir) / "config.gin").write_text(gin.config_str())
  if mode == "ablations":
    from score_jax.eval import ablations  # pylint: disable=g-import-not-at-top
    return ablations.run(workdir, task)
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
  (checkpoints.resolve(workdir) / "table.md").write_text(table + "\n")
  print("\n" + table)
  if jax.process_index() == 0:  # Only process 0 wrote metrics and results.
    print("report:", report.write_report([workdir], workdir))
  return rows
