"""Experiments: the modes of `python -m score_jax.main`, configured by gin.

  sft        train the base model on the task's transcripts (the toy demo's base model)
  stage1     SCoRe Stage I from `experiment.init_from` (reference: `experiment.reference_from`)
  stage2     SCoRe Stage II from Stage I's export (reference: the base model)
  multi_turn, single_turn   the paper's ablations / baselines
  eval       greedy multi-attempt evaluation of `experiment.init_from`
  pipeline   sft -> eval(base) -> stage1 -> stage2 -> eval(stage1, stage2) and the Table 2
             shaped summary, each under its own sub-directory of the work dir; then
             report.md with the table, training curves and edit-ratio histograms (report.py).

Each mode reads its gin bindings in a scope named after it, so one config can hold
`sft/RunConfig.steps = 600` and `stage2/RunConfig.steps = 200` side by side.
"""

import dataclasses
import os
from typing import Any, Optional

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


@gin.configurable
def policy_source(model: str = "toy", chat_format: str = "auto") -> tuple[str, str]:
  """Where the starting model comes from when no `init_from` is given.

  model: "toy" (a small random model over the toy task's characters, `toy.model_config`),
    or any source `loading.load` accepts (a shipped name, a GGUF file, a HF directory).
  chat_format: conversation format of real models: "gemma", "chatml", "plain" (see chat.py)
    or "auto": the GGUF's own chat template where it has one, else "plain".
  """
  return model, chat_format


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
  if path is not None:
    export = os.path.join(path, "export")
    if not os.path.isdir(export):
      raise UserError(f"no exported model in {path!r} (expected {export}/): run the "
                              "previous stage first, or fix experiment.init_from")
    from score_jax import loading  # pylint: disable=g-import-not-at-top
    model_cfg, params, vocab = loading.load(export)
    spec = loading.export_vocab_spec(export)
  elif source == "toy":
    if not isinstance(task, toy.ToyArithmetic):
      raise UserError("policy_source.model = 'toy' only works with the toy task")
    vocab = task.vocab
    model_cfg = toy.model_config(vocab.vocab_size)
    params = model_lib.init_params(model_cfg, jax.random.PRNGKey(seed))
    spec = {"kind": "char", "alphabet": toy.ALPHABET}
  else:
    from score_jax import loading  # pylint: disable=g-import-not-at-top
    model_cfg, params, vocab = loading.load(source)
    spec = {"kind": "source", "source": source}
  conv = _conversation(task, vocab, chat_format, spec.get("source", source))
  return trainer.Policy(model_cfg, params, conv, spec)


@gin.configurable
def eval_config(num_problems: Optional[int] = None, batch_size: int = 250,
                num_attempts: int = 2, split: str = "test",
                task: Optional[tasks.Task] = None) -> dict[str, Any]:
  """Evaluation settings: the first `num_problems` of `split` (all when None), of `task` when
  given (e.g. train on MBPP, evaluate on HumanEval), else of the experiment's task."""
  return dict(num_problems=num_problems, batch_size=batch_size, num_attempts=num_attempts,
              split=split, task=task)


def run_eval(workdir: str, task: tasks.Task, policy: trainer.Policy) -> dict[str, float]:
  cfg = eval_config()
  run_cfg = trainer.RunConfig()
  if cfg["task"] is not None and cfg["task"] is not task:
    task = cfg["task"]
    policy = dataclasses.replace(
        policy, conv=dataclasses.replace(policy.conv, task=task))
  examples = task.examples(cfg["split"])[:cfg["num_problems"]]
  sampler = policy.conv.make_sampler(policy.model_cfg, num_attempts=cfg["num_attempts"],
                                     max_new_tokens=run_cfg.max_new_tokens,
                                     max_prompt_len=run_cfg.max_prompt_len)
  with trainer.make_pool(run_cfg.reward_workers) as pool:
    metrics, samples = evaluation.evaluate(policy.conv, sampler, jax.device_put(policy.params),
                                           task,
                                           examples, pool, batch_size=cfg["batch_size"])
  if jax.process_index() == 0:  # Every process evaluated every problem (see evaluate).
    evaluation.write_results(workdir, metrics, samples)
  print(evaluation.markdown_table({os.path.basename(workdir.rstrip("/")): metrics}))
  return metrics


def run_mode(mode: str, workdir: str, task: tasks.Task, init_from: Optional[str],
             reference_from: Optional[str]) -> trainer.Policy:
  """One mode, with gin scope `mode` (so `stage1/RunConfig.steps = ...` applies)."""
  with gin.config_scope(mode):
    run_cfg = trainer.RunConfig()
    if mode == "eval":
      policy = load_policy(task, init_from, run_cfg.seed)
      run_eval(workdir, task, policy)
      return policy
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


@gin.configurable
def experiment(mode: str = gin.REQUIRED, workdir: str = gin.REQUIRED,
               task: tasks.Task = gin.REQUIRED, init_from: Optional[str] = None,
               reference_from: Optional[str] = None) -> Any:
  """Runs `mode` (see the module docstring) in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.gin"), "w") as f:
      f.write(gin.config_str())
  if mode != "pipeline":
    return run_mode(mode, workdir, task, init_from, reference_from)
  return pipeline(workdir, task)


def pipeline(workdir: str, task: tasks.Task) -> dict[str, dict[str, float]]:
  """sft -> eval(base) -> stage1 -> stage2 -> eval(stage1, stage2); the Table 2 summary."""
  d = lambda name: os.path.join(workdir, name)
  run_mode("sft", d("base"), task, None, None)
  run_mode("stage1", d("stage1"), task, d("base"), d("base"))
  run_mode("stage2", d("stage2"), task, d("stage1"), d("base"))
  rows = {}
  with gin.config_scope("eval"):
    for name, src in (("base model", "base"), ("Stage I only", "stage1"), ("SCoRe", "stage2")):
      rows[name] = run_eval(d(f"eval_{src}"), task, load_policy(task, d(src)))
  table = evaluation.markdown_table(rows)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table + "\n")
  print("\n" + table)
  if jax.process_index() == 0:  # Only process 0 wrote metrics and results.
    print("report:", report.write_report([workdir], workdir))
  return rows
