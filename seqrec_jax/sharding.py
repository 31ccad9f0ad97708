"""Device mesh, logical-axis rules and the Partitioner that owns them.

One object owns the mesh (the RecML habit): the loop and the models never build shardings
themselves.  The Partitioner has three verbs:

  * `shard_inputs(host_batch)`: this process's rows -> global arrays sharded over the batch axes;
  * `partition_init(init_fn, *args)`: runs an initialiser so the state is *born* sharded, with the
    shardings derived from the abstract (boxed) state and the logical-axis rules;
  * `partition_step(fn, ...)`: jits a step with explicit in/out shardings and donation.

Logical axes are one vocabulary for the whole project:
  batch, length, embed, mlp, heads, kv, vocab (items / tokens).
The rules mapping them to mesh axes (`data`, `fsdp`, `tensor`) are config data.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes.  T5X-style: batch over data x fsdp; weights' embed dim over fsdp
# (ZeRO-3 style); the wide dims (mlp, heads, vocab) over tensor.
DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("mlp_out", None),  # second width axis of square [mlp, mlp] kernels (GRU recurrences)
    ("heads", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    # Decoder LMs (calrec_jax): the stacked-layers axis of scanned blocks stays unsharded, and so
    # do key/value heads (multi-query attention has a single one, which cannot be split).
    ("layers", None),
    ("kv_heads", None),
)


def rules_from_config(rules: Optional[Sequence[Sequence[Any]]]) -> Tuple[Tuple[str, Any], ...]:
  """Normalises rules from a ConfigDict (lists or tuples) into a tuple of (name, mesh axes)."""
  if not rules:
    return DEFAULT_RULES
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"config.mesh.rules[{i}] = {rule!r} is not a (logical, mesh) pair")
    logical, mesh_axes = rule
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    for axis in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"config.mesh.rules[{i}] maps {logical!r} to unknown mesh axis {axis!r}; "
                         f"mesh axes are {MESH_AXES}")
    out.append((logical, mesh_axes))
  return tuple(out)


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None
              ) -> jax.sharding.Mesh:
  """Builds a (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices.

  Args:
    shape: {"data": n, "fsdp": n, "tensor": n}; missing axes are 1.
    devices: defaults to all devices of all processes.

  Returns:
    A Mesh with Auto axis types (linen's logical constraints need Auto, not Explicit).
  """
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh.shape has unknown axes {unknown}; allowed: {MESH_AXES}")
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh.shape {dict(shape)}: at most one axis may be -1")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if len(devices) % rest:
      raise ValueError(f"config.mesh.shape {dict(shape)}: {len(devices)} devices are not "
                       f"divisible by the fixed axes' product {rest}")
    sizes[sizes.index(-1)] = len(devices) // rest
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh.shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices but {len(devices)} are available")
  if any(s < 1 for s in sizes):
    raise ValueError(f"config.mesh.shape {dict(shape)}: sizes must be positive or -1")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


class Partitioner:
  """Owns the mesh and the logical-axis rules; shards inputs, state and steps."""

  def __init__(self, mesh: jax.sharding.Mesh, rules: Sequence[Tuple[str, Any]] = DEFAULT_RULES):
    self.mesh = mesh
    self.rules = tuple(rules)
    self.batch_axes = nn.logical_to_mesh_axes(("batch",), self.rules)[0]

  @property
  def batch_size_multiple(self) -> int:
    """Global batch sizes must be a multiple of the number of batch shards."""
    axes = self.batch_axes if isinstance(self.batch_axes, tuple) else (self.batch_axes,)
    return math.prod(self.mesh.shape[a] for a in axes if a is not None)

  @contextlib.contextmanager
  def context(self):
    """Mesh + rules context: lets `nn.with_logical_constraint` inside models resolve."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def batch_sharding(self, ndim: int) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over the batch axes, the rest replicated."""
    return NamedSharding(self.mesh, P(self.batch_axes, *([None] * (ndim - 1))))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def shard_inputs(self, host_batch: Mapping[str, np.ndarray]) -> Dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded over the batch axes.

    Every process passes its own `global_batch // process_count` rows; the global batch is the
    concatenation in process order (`jax.make_array_from_process_local_data`).
    """
    return {k: jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(v)), v)
            for k, v in host_batch.items()}

  def logical_shardings(self, abstract_tree: Any) -> Any:
    """Shardings for a (possibly boxed) abstract pytree from its logical axis names.

    Leaves without logical names (step counters, rng keys, optimizer counts) are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  def partition_init(self, init_fn: Callable[..., Any], *args) -> Tuple[Any, Any]:
    """Runs `init_fn(*args)` so that its output is born sharded.

    Args:
      init_fn: returns a pytree whose parameters are `nn.LogicallyPartitioned` boxes.
      *args: its (replicated) arguments, e.g. an rng key.

    Returns:
      (unboxed sharded state, its shardings pytree).
    """
    with self.context():
      abstract = jax.eval_shape(init_fn, *args)
      shardings = self.logical_shardings(abstract)
      jitted = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)
      return jitted(*args), shardings

  def partition_step(self, fn: Callable[..., Any], *, in_shardings: Any, out_shardings: Any,
                     donate_argnums: Sequence[int] = ()) -> Callable[..., Any]:
    """jits `fn` with explicit shardings; the returned callable runs inside the mesh context."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=tuple(donate_argnums))

    def run(*args):
      with self.context():
        return jitted(*args)

    run.jitted = jitted  # for lowering / cost analysis in benchmarks
    return run

  def abstract_with_shardings(self, tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the restore target for a checkpoint."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def partitioner_from_config(mesh_config) -> Partitioner:
  """Builds a Partitioner from `config.mesh` ({shape: {...}, rules: [...]})."""
  shape = dict(mesh_config.shape)
  rules = rules_from_config(mesh_config.get("rules", None))
  num_devices = int(mesh_config.get("num_devices", -1))
  devices = jax.devices()
  if num_devices > 0:
    if num_devices > len(devices) or jax.process_count() > 1:
      raise ValueError(f"config.mesh.num_devices={num_devices} needs a single process with at least "
                       f"that many devices ({len(devices)} devices, {jax.process_count()} processes)")
    devices = devices[:num_devices]
  return Partitioner(make_mesh(shape, devices), rules)
