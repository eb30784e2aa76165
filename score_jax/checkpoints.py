"""Train-state checkpoints (resume, best by reward) and self-contained parameter exports.

`Checkpointer(directory)` runs one orbax `CheckpointManager` in `directory`:

    directory/<step>/state/    the TrainState arrays
    directory/<step>/meta/     a JSON dict from the trainer (data iterator state, config, ...)
    directory/<step>/metrics/  {"reward": r}, when the save was given a reward

Which checkpoints stay: the `keep` newest, plus the one with the highest reward even when it
is older (the paper picks checkpoints by training reward). One orbax preservation policy
(LatestN(keep) or BestN(1)) decides this in the same directory, so the best checkpoint is
never a second copy; a checkpoint saved without a reward counts only among the newest.
The trainer saves a smoothed reward (`MovingMean` of the per-step training reward), so one
lucky batch does not pick the checkpoint.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it once
complete. A save killed midway leaves only that temporary directory, which `latest_step`
ignores and which is deleted when a `Checkpointer` next opens the directory.

Saves are asynchronous: `save` returns once the arrays are copied to host memory (the state
may be donated to the next train step right away) and a background thread writes them;
`wait()` and `close()` block until everything is on disk.

Paths may be local or remote (`gs://bucket/...`): they go through `etils.epath`, and orbax
writes Cloud Storage natively.

`export_params` / `load_export` write and read a directory that evaluation can use on its own:

    directory/model_config.json  dataclasses.asdict(ModelConfig), dtypes by name
    directory/params/            the parameters (orbax)
    directory/vocab.json         how to rebuild the vocabulary (whatever the trainer passes)
"""

import collections
import dataclasses
import functools
import json
import math
from typing import Any, Iterable, Optional

from etils import epath
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from score_jax.models import transformer as model_lib
from score_jax.rl import train_step as ts

_REWARD = "reward"
_STATE, _META = "state", "meta"
_REF = "ref_params"
_EXPORT_CONFIG, _EXPORT_PARAMS, _EXPORT_VOCAB = "model_config.json", "params", "vocab.json"


class CheckpointMismatchError(ValueError):
  """Stored arrays do not have the shapes (or tree) of the model being restored."""


def resolve(path: Any) -> epath.Path:
  """`path` as an `epath.Path`: local paths made absolute, `gs://...` and the like as they are."""
  path = epath.Path(path)
  return path if "://" in str(path) else path.absolute()


def _key_name(key: Any) -> str:
  """One key of a tree path as text: dict key, attribute name or sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/layer_0/attn/q": shape, ...} for arrays, abstract arrays or orbax metadata."""
  return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  what: str, hint: str) -> None:
  """Raises CheckpointMismatchError naming the first differing array (parameters first)."""
  def describe(shape):
    return "nothing" if shape is None else f"shape {shape}"

  paths = sorted(set(stored) | set(expected), key=lambda p: (not p.startswith("params/"), p))
  diffs = [f"{p} stored {describe(stored.get(p))}, expected {describe(expected.get(p))}"
           for p in paths if stored.get(p) != expected.get(p)]
  if diffs:
    more = f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else ""
    raise CheckpointMismatchError(f"{what} does not match the model: {diffs[0]}{more}; {hint}")


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs with each leaf's sharding (default: the first local device)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default), tree)


def _check_json(value: Any, what: str) -> None:
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} must be JSON-serializable: {e}") from e


class MovingMean:
  """The mean of the last `window` values added (of all of them while there are fewer)."""

  def __init__(self, window: int, values: Iterable[float] = ()):
    """`values`: earlier values, oldest first (from `values()`, to continue after a resume)."""
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window}")
    self._values = collections.deque((float(v) for v in values), maxlen=window)

  def add(self, value: float) -> float:
    """Adds `value`; returns the mean of the window."""
    self._values.append(float(value))
    return sum(self._values) / len(self._values)

  def values(self) -> list[float]:
    """The values in the window, oldest first."""
    return list(self._values)


class Checkpointer:
  """Saves and restores `TrainState`s plus a JSON dict in one directory (see module doc)."""

  def __init__(self, directory: str, keep: int = 3, *, save_ref: bool = True):
    """Opens (creating if needed) `directory`.

    Args:
      directory: where the step directories live; one model shape per directory.
      keep: how many of the newest checkpoints to keep (the best by reward is kept as well).
      save_ref: also save `TrainState.ref_params`. Without it, `restore` takes the reference
        parameters from its target (they are the frozen start model, loadable elsewhere).
    """
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = resolve(directory)
    self._save_ref = save_ref
    best_fn = lambda metrics: metrics[_REWARD]
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn,  # Makes orbax store the metrics and answer best_step().
        best_mode="max",
        preservation_policy=ocp_managers.AnyPreservationPolicy([
            ocp_managers.LatestN(keep),
            ocp_managers.BestN(get_metric_fn=best_fn, n=1,
                               keep_checkpoints_without_metrics=False)]),
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _META: ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: ts.TrainState, meta: dict, *,
           reward: Optional[float] = None) -> bool:
    """Starts saving `state` and `meta` as checkpoint `step` (asynchronously).

    Args:
      step: the checkpoint's number; a step at or before the latest saved one is skipped.
      state: the train state (arrays of any sharding).
      meta: JSON-serializable dict returned by `restore` (data iterator state, seeds, ...).
      reward: the training reward at this step, ranks checkpoints for `best_step`.
    Returns:
      Whether a save was started.
    """
    _check_json(meta, "meta")
    metrics = None
    if reward is not None:
      reward = float(reward)
      if not math.isfinite(reward):
        raise ValueError(f"reward must be a finite number, got {reward}")
      metrics = {_REWARD: reward}
    if not self._save_ref:
      state = state.replace(ref_params=None)
    return self._manager.save(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                         _META: ocp.args.JsonSave(meta)}),
        metrics=metrics)

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints present, oldest first."""
    return list(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest checkpoint (a save still in flight in this process counts), or None."""
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    """The checkpoint with the highest reward, or None if no checkpoint has a reward."""
    return self._manager.best_step()

  def reward(self, step: int) -> Optional[float]:
    """The reward saved with checkpoint `step`, or None."""
    metrics = self._manager.metrics(step)
    return None if metrics is None else metrics[_REWARD]

  def meta(self, step: int) -> dict:
    """The JSON dict saved with checkpoint `step`, without reading its arrays."""
    self._manager.wait_until_finished()
    return self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
                                 )[_META]

  def restore(self, step: Optional[int], target: ts.TrainState) -> tuple[ts.TrainState, dict]:
    """Reads checkpoint `step` (None: the latest) as `target`'s tree, dtypes and shardings.

    Args:
      step: the checkpoint to read; None for the latest.
      target: a TrainState of arrays or of ShapeDtypeStructs (e.g. from `jax.eval_shape`,
        with `sharding` set to restore sharded; leaves without one go to the first local
        device). Stored arrays are cast to the target's dtypes.
    Returns:
      (state, meta) as saved.
    Raises:
      FileNotFoundError: no checkpoint at all, or none of `step`.
      CheckpointMismatchError: the stored shapes differ from the target's.
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; "
                              f"it has steps {steps}")
    stored = _shapes(self._manager.item_metadata(step)[_STATE])
    with_ref = any(path.split("/", 1)[0] == _REF for path in stored)
    item = target
    if not with_ref:
      if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target.ref_params)):
        raise ValueError(f"checkpoint {step} in {self.directory} was saved without "
                         f"ref_params; pass the reference parameters as arrays in the target")
      item = target.replace(ref_params=None)
    _check_shapes(stored, _shapes(item), f"checkpoint {step} in {self.directory}",
                  "it holds another model: use a fresh work dir for this model")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(_abstract(item)),
                                         _META: ocp.args.JsonRestore()}))
    state = restored[_STATE]
    if not with_ref:
      state = state.replace(ref_params=target.ref_params)
    return state, restored[_META]

  def restore_best(self, target: ts.TrainState) -> tuple[ts.TrainState, dict]:
    """`restore` of `best_step()`; FileNotFoundError if no checkpoint has a reward."""
    step = self.best_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint with a reward in {self.directory}")
    return self.restore(step, target)

  def wait(self) -> None:
    """Blocks until every save started so far is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _param_shapes(cfg: model_lib.ModelConfig) -> Any:
  """ShapeDtypeStructs of `model.init_params(cfg, ...)`."""
  return jax.eval_shape(functools.partial(model_lib.init_params, cfg), jax.random.PRNGKey(0))


def _write_json(path: epath.Path, value: Any) -> None:
  """Writes `value` to `path` through a temporary file, so readers never see half a file."""
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2))
  tmp.replace(path)


def _config_from_dict(fields: dict, path: str) -> model_lib.ModelConfig:
  known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{path}: unknown ModelConfig fields {unknown}")
  fields = dict(fields)
  for key in ("dtype", "param_dtype"):
    if key in fields:
      try:
        fields[key] = getattr(jnp, jnp.dtype(fields[key]).name)
      except (TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unknown {key} {fields[key]!r}") from e
  if fields.get("llama3_rope") is not None:  # JSON has lists; the config must be hashable.
    fields["llama3_rope"] = tuple(fields["llama3_rope"])
  try:
    return model_lib.ModelConfig(**fields)
  except TypeError as e:
    raise ValueError(f"{path}: {e}") from e


def export_params(directory: str, model_cfg: model_lib.ModelConfig, params: Any,
                  vocab_spec: dict) -> None:
  """Writes the model config, `params` and `vocab_spec` to `directory` (see module doc).

  An earlier export in `directory` is replaced. `model_config.json` is written last, so a
  directory that has it holds a complete export. Blocks until everything is on disk.

  Args:
    directory: the export directory (created if needed).
    model_cfg: the architecture of `params`.
    params: the parameter tree (arrays of any sharding, or numpy).
    vocab_spec: JSON-serializable description of the tokenizer, returned by `load_export`.
  """
  directory = resolve(directory)
  _check_shapes(_shapes(params), _shapes(_param_shapes(model_cfg)), "params to export",
                "export the parameters of the given model config")
  _check_json(vocab_spec, "vocab_spec")
  config = dataclasses.asdict(model_cfg)
  config["dtype"] = jnp.dtype(model_cfg.dtype).name
  config["param_dtype"] = jnp.dtype(model_cfg.param_dtype).name
  config_path = directory / _EXPORT_CONFIG
  primary = jax.process_index() == 0
  if primary:
    directory.mkdir(parents=True, exist_ok=True)
    if config_path.exists():  # Incomplete until the new parameters are written.
      config_path.unlink()
  # Every process writes its own shards of sharded arrays: nothing is gathered to one host.
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / _EXPORT_PARAMS, params, force=True)
  if primary:
    _write_json(directory / _EXPORT_VOCAB, vocab_spec)
    _write_json(config_path, config)


def load_export(directory: str, shardings: Any = None, dtype: Any = None
                ) -> tuple[model_lib.ModelConfig, Any, dict]:
  """Reads an `export_params` directory: (model config, params, vocab spec).

  Args:
    directory: the export directory.
    shardings: optional tree of `jax.sharding.Sharding`s like the parameters (e.g.
      `partitioning.model_param_shardings`), or one Sharding for all of them; default:
      everything on the first local device.
    dtype: the parameters' dtype (each array is cast as it is read); default: the config's
      `param_dtype`.
  Returns:
    The config, the parameters as jax arrays, and the vocab spec.
  """
  directory = resolve(directory)
  config_path = directory / _EXPORT_CONFIG
  if not config_path.is_file():
    raise FileNotFoundError(f"{directory} holds no complete export (no {_EXPORT_CONFIG})")
  cfg = _config_from_dict(json.loads(config_path.read_text()), str(config_path))
  vocab_spec = json.loads((directory / _EXPORT_VOCAB).read_text())
  target = _param_shapes(cfg)
  if dtype is not None:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), target)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, target)
  if shardings is not None:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          target, shardings)
  params_path = directory / _EXPORT_PARAMS
  with ocp.StandardCheckpointer() as checkpointer:
    stored = _shapes(checkpointer.metadata(params_path).item_metadata)
    _check_shapes(stored, _shapes(target), f"export {directory}",
                  f"its {_EXPORT_CONFIG} does not describe its parameters")
    params = checkpointer.restore(params_path, _abstract(target))
  return cfg, params, vocab_spec
