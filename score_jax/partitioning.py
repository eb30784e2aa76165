"""Partitioning: the device mesh, logical-axis rules, and shardings for train-state pieces.

The model names every parameter dimension and its main activations with logical axes
("embed", "act_batch", ...; see `models/transformer.py`). This module maps those names onto a 3-axis
device mesh:

* "data":   pure data parallelism (parameters replicated along it);
* "fsdp":   data parallelism whose devices also split the parameters (ZeRO-3 style);
* "tensor": tensor (model) parallelism inside a layer.

Rules are a sequence of `(logical_name, mesh_axes)` pairs, `mesh_axes` being a mesh axis
name, a tuple of them, or None (replicated). They apply in order of priority, as flax applies
them to activations: a rule gives its mesh axes to a dimension of its logical name that is
still unassigned when those axes are not already used by another dimension of the same array
and the dimension size is divisible by the product of their sizes. A dimension no rule can
take is replicated; so a single KV head, or a vocabulary size that the tensor axis does not
divide, still works (replicated on that dimension), and a later rule of the same name can
name a fallback.

The vocabulary is split over ("tensor", "fsdp") ahead of everything else: the embedding is
[V / (tensor * fsdp), D] on each device, and the log-prob chunks (`logprobs.py`) gather the
few rows of hidden states rather than the embedding, so no device ever holds the whole
[V, D] matrix (1.2 GB in bfloat16 for Gemma).

Parameters and batches need that divisibility (an input array must split evenly).
Activation constraints (`nn.with_logical_constraint` inside the model) do not: XLA pads
uneven shards, so the same rules serve both without a fallback there.

Multi-host: `make_mesh` uses `jax.devices()`, the devices of every process, and
`host_local_to_global` assembles per-process batch rows into one global array.
"""

import contextlib
import functools
import math
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from score_jax.models import transformer as model_lib

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes that split the batch (leading) dimension of inputs and activations.
BATCH_AXES = ("data", "fsdp")

MeshAxes = Union[None, str, tuple[str, ...]]
LogicalRules = Sequence[tuple[str, MeshAxes]]
Rules = tuple[tuple[str, MeshAxes], ...]  # normalized (see `normalize_rules`)

DEFAULT_RULES: Rules = (
    # Parameters.
    ("vocab", ("tensor", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", None),
    ("act_mlp", "tensor"),
    ("act_vocab", ("tensor", "fsdp")),  # where the batch is not split (log-prob chunks)
    ("act_vocab", "tensor"),
)


def _as_axes(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def normalize_rules(rules: LogicalRules, mesh_axis_names: Sequence[str] = MESH_AXES) -> Rules:
  """Rules as a tuple with mesh axes None, a name, or a tuple of 2+ names (lists from gin ok).

  Raises ValueError if a rule is malformed or names an axis the mesh does not have.
  """
  normalized = []
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"rule {rule!r} is not a (logical_name, mesh_axes) pair")
    axes = _as_axes(rule[1])
    unknown = [a for a in axes if a not in mesh_axis_names]
    if unknown:
      raise ValueError(f"rule {rule!r} names mesh axes {unknown} not in the mesh "
                       f"{tuple(mesh_axis_names)}")
    normalized.append((rule[0], _spec_entry(axes)))
  return tuple(normalized)


def _spec_entry(axes: tuple[str, ...]) -> MeshAxes:
  """One PartitionSpec entry: None, a single axis name, or a tuple of names."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


@gin.configurable
def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1) -> tuple[int, int, int]:
  """The gin entry point for the mesh: sizes of ("data", "fsdp", "tensor"); -1 absorbs the rest."""
  return data, fsdp, tensor


@gin.configurable
def axis_rules(overrides: Optional[Mapping[str, MeshAxes]] = None) -> Rules:
  """The gin entry point for the rules: `DEFAULT_RULES` with some logical names remapped.

  E.g. in gin: `axis_rules.overrides = {"kv_heads": "tensor", "embed": None}`.
  """
  overrides = dict(overrides or {})
  known = {name for name, _ in DEFAULT_RULES}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"unknown logical axis names {unknown}; known: {sorted(known)}")
  return normalize_rules([(name, overrides.get(name, axes)) for name, axes in DEFAULT_RULES])


def make_mesh(shape: Union[Sequence[int], Mapping[str, int]] = (-1, 1, 1),
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over ("data", "fsdp", "tensor").

  Args:
    shape: three axis sizes in `MESH_AXES` order, or a dict from axis name to size (missing
      axes have size 1). One size may be -1: it takes all devices the others leave.
    devices: the devices to use, all of them; default `jax.devices()` (every process's).
  Returns:
    A mesh whose axes are `AxisType.Auto` (the compiler propagates shardings).
  """
  if isinstance(shape, Mapping):
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
      raise ValueError(f"unknown mesh axes {unknown}; the axes are {MESH_AXES}")
    shape = tuple(shape.get(axis, 1) for axis in MESH_AXES)
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} sizes {MESH_AXES}")
  if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
  devices = list(jax.devices() if devices is None else devices)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape}: {len(devices)} devices are not a multiple of "
                       f"{known}")
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, but "
                     f"{len(devices)} are given")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_mesh_spec(logical: Optional[PartitionSpec], shape: Sequence[int],
                         axis_sizes: Mapping[str, int], rules: LogicalRules) -> PartitionSpec:
  """The mesh PartitionSpec of one array (see the module docstring for how rules apply).

  Args:
    logical: logical name (or None) per leading dimension; None: replicated everywhere.
    shape: the array's shape; dimensions past `len(logical)` are replicated.
    axis_sizes: mesh axis name -> size (`mesh.shape`).
    rules: (logical_name, mesh_axes) pairs.
  """
  names = tuple(logical) if logical is not None else ()
  if not all(name is None or isinstance(name, str) for name in names):
    raise ValueError(f"logical axes {names} must be names (str) or None")
  if len(names) > len(shape):
    raise ValueError(f"logical axes {names} have more entries than the shape {tuple(shape)}")
  unknown = sorted({n for n in names if n is not None} - {logical for logical, _ in rules})
  if unknown:
    raise ValueError(f"no partitioning rule for logical axis {unknown[0]!r}")
  # Rules in order of priority, as flax applies them to activations: a rule takes its
  # dimension when that is still unassigned, its mesh axes are free and they divide the size.
  spec: list[MeshAxes] = [None] * len(names)
  assigned, used = set(), set()
  for logical_name, mesh_axes in rules:
    axes = _as_axes(mesh_axes)
    for dim, (name, size) in enumerate(zip(names, shape)):
      if (name == logical_name and dim not in assigned and not used.intersection(axes)
          and _divides(axes, size, axis_sizes)):
        spec[dim] = _spec_entry(axes)
        assigned.add(dim)
        used.update(axes)
  return PartitionSpec(*spec)


def _divides(mesh_axes: tuple[str, ...], size: int, axis_sizes: Mapping[str, int]) -> bool:
  """Whether a dimension of `size` splits evenly over `mesh_axes`."""
  return size % math.prod(axis_sizes[a] for a in mesh_axes) == 0


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def logical_to_sharding(logical_specs: Any, shapes: Any, mesh: Mesh,
                        rules: LogicalRules) -> Any:
  """A tree of NamedShardings from logical specs and shapes of the same tree structure.

  Args:
    logical_specs: tree of logical PartitionSpecs (or None: replicated), e.g.
      `model.logical_axes(cfg)`.
    shapes: arrays or ShapeDtypeStructs, same structure (e.g. from `jax.eval_shape`).
    mesh: the device mesh.
    rules: (logical_name, mesh_axes) pairs.
  """
  rules = normalize_rules(rules, mesh.axis_names)

  def one(path, logical, leaf):
    try:
      spec = logical_to_mesh_spec(logical, _shape(leaf), mesh.shape, rules)
    except ValueError as e:
      raise ValueError(f"{jax.tree_util.keystr(path)}: {e}") from e
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      one, logical_specs, shapes, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))


def model_param_shardings(cfg: model_lib.ModelConfig, mesh: Mesh, rules: LogicalRules) -> Any:
  """Shardings of `model.init_params(cfg, ...)`'s tree (use for reference params too)."""
  shapes = jax.eval_shape(functools.partial(model_lib.init_params, cfg),
                          jax.random.PRNGKey(0))
  return logical_to_sharding(model_lib.logical_axes(cfg), shapes, mesh, rules)


def _fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
  """Whether `sharding` splits an array of `shape` evenly."""
  spec = tuple(sharding.spec)
  return len(spec) <= len(shape) and all(
      _divides(_as_axes(axes), size, sharding.mesh.shape) for axes, size in zip(spec, shape))


def opt_state_shardings(opt_state_shapes: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of an optimizer state: each moment like its parameter, the rest replicated.

  Optax states hold per-parameter trees (Adam's mu and nu) nested under their own keys, so
  the key path of a moment ends with the key path of its parameter. A leaf whose path ends
  with a parameter's path (the longest such) takes that parameter's sharding when it fits
  the leaf's shape; every other leaf (step counts, factored statistics, ...) is replicated.

  Args:
    opt_state_shapes: the optimizer state, or its `jax.eval_shape(tx.init, params)`.
    param_shardings: tree of NamedShardings of the parameters.
    mesh: the mesh, for replicated leaves.
  """
  by_path = dict(jax.tree_util.tree_leaves_with_path(param_shardings))
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    shape = _shape(leaf)
    for start in range(len(path)):
      sharding = by_path.get(tuple(path[start:]))
      if sharding is not None:
        return sharding if _fits(sharding, shape) else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(one, opt_state_shapes)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"), the rest replicated; ndim 0: replicated."""
  if ndim == 0:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def data_sharding(tree: Any, mesh: Mesh) -> Any:
  """`batch_sharding` for every leaf of a batch tree (arrays or ShapeDtypeStructs).

  Raises ValueError when a leading dimension is not divisible by the data-parallel size.
  """
  parallel = math.prod(mesh.shape[a] for a in BATCH_AXES)

  def one(path, leaf):
    shape = _shape(leaf)
    if shape and shape[0] % parallel:
      raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has leading dimension "
                       f"{shape[0]}, not divisible by data * fsdp = {parallel}")
    return batch_sharding(mesh, len(shape))

  return jax.tree_util.tree_map_with_path(one, tree)


@contextlib.contextmanager
def with_mesh_and_rules(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
  """Makes `nn.with_logical_constraint` in model code traced inside this context apply.

  Sets `mesh` as the current mesh (`jax.set_mesh`) and `rules` as flax's logical-axis rules.
  Both are read when a jitted function is traced, so call (trace) it inside the context.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(normalize_rules(rules, mesh.axis_names)):
    yield


def host_local_to_global(tree: Any, mesh: Mesh,
                         spec: PartitionSpec = PartitionSpec(BATCH_AXES)) -> Any:
  """Global arrays from each process's rows of a batch (numpy or jax arrays).

  Every process passes its own part along the axes `spec` splits across processes; the
  global shape is the concatenation. Each leaf needs at least `len(spec)` dimensions. With
  one process the local data is the whole array and this is a `device_put` with the sharding.
  """
  sharding = NamedSharding(mesh, spec)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
