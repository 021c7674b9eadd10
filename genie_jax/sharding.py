"""Device mesh and sharding by logical axis names.

Every parameter and key activation names its axes with logical names ("embed", "mlp",
"act_batch", ...). One rules table, taken from the config, maps each logical name to mesh axes, so
the same model runs data parallel, FSDP or tensor parallel depending only on the mesh shape and
the rules. A logical name missing from the rules is an error, never a silent replication.

Activations' names start with "act_", parameters' do not: they name the model width apart
("embed" vs "act_embed") because FSDP shards the width of parameters over the same mesh axis
that shards the batch of activations.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# The logical name of the examples' axis of every batch.
BATCH = "act_batch"
# Activation names of configs written before every activation name started with "act_".
_LEGACY_NAMES = {"batch": "act_batch", "time": "act_time", "tokens": "act_tokens"}

# Mesh axis order: outermost (slowest interconnect) first.
MESH_AXES = ("data", "fsdp", "tensor")

# Defaults that make DP, FSDP and TP a matter of the mesh shape alone.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Activations.
    ("act_batch", ("data", "fsdp")),
    ("act_time", None),
    ("act_tokens", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", None),
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("patch", None),
    ("latent", None),
    ("vocab", None),
    ("positions", None),
    ("qkv", None),
)


def _axes_of(rules: Rules, logical: str) -> tuple[str, ...]:
  """The mesh axes the rules map a logical name to (a tuple, possibly empty)."""
  table = dict(rules)
  if logical not in table:
    raise ValueError(f"config.sharding.rules has no rule for the logical axis {logical!r}; "
                     f"add one (e.g. [{logical!r}, None] to replicate it)")
  axes = table[logical]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def single_device_mesh_shape() -> dict[str, int]:
  """Every mesh axis of size 1."""
  return {name: 1 for name in MESH_AXES}


def default_mesh_shape(rules: Rules = DEFAULT_RULES) -> dict[str, int]:
  """All devices on the first mesh axis the batch is split over (weights replicated,
  batches split), every other axis 1."""
  axes = _axes_of(rules, BATCH)
  if not axes:
    raise ValueError(f"config.sharding.rules maps {BATCH!r} to no mesh axis, so batches "
                     f"cannot be split; map it to one (default: {dict(DEFAULT_RULES)[BATCH]})")
  return dict(single_device_mesh_shape(), **{axes[0]: -1})


def data_parallel_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes a batch is split over."""
  return _axes_of(rules, BATCH)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  """How many ways a batch is split: the product of `data_parallel_axes` on the mesh."""
  return math.prod(mesh.shape[a] for a in data_parallel_axes(rules))


def _axis_sizes(shape: Mapping[str, int], key: str) -> list[int]:
  """The sizes of `shape` in `MESH_AXES` order (1 where missing); unknown axes are an error."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"{key} has unknown axes {sorted(unknown)}; known: {MESH_AXES}")
  return [int(shape.get(name, 1)) for name in MESH_AXES]


def _resolve_sizes(shape: Mapping[str, int], num_devices: int, key: str) -> list[int]:
  """Sizes of `MESH_AXES` for `num_devices`; one size may be -1 (the remaining devices)."""
  sizes = _axis_sizes(shape, key)
  if sizes.count(-1) > 1:
    raise ValueError(f"{key}: at most one axis may be -1, got {dict(shape)}")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or num_devices % known:
    raise ValueError(
        f"{key}={dict(shape)} needs a multiple of {known} devices, but there are "
        f"{num_devices}; change {key} so that the product of its sizes divides "
        f"{num_devices} (use -1 for one axis to take the rest).")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"{key}={dict(shape)} uses {math.prod(sizes)} devices but there are "
        f"{num_devices}; set one axis to -1 or make the sizes multiply to {num_devices}.")
  return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None, *,
              dcn_shape: Mapping[str, int] | None = None) -> Mesh:
  """Builds a mesh with axes `MESH_AXES`; one size of `shape` may be -1 (the remaining devices).

  With `dcn_shape` (config.mesh_dcn) the mesh is hybrid, for jobs spanning several TPU slices:
  `shape` (config.mesh) is the mesh within one slice (fast ICI links) and `dcn_shape` the mesh
  of slices (slow data-centre network). Each axis of the result has size
  shape[axis] * dcn_shape[axis], slice-major: along `data`, say, the first shape['data']
  indices are devices of one slice. Put only data parallelism across slices (e.g.
  dcn_shape={'data': 2}): its gradient all-reduce is the one collective per step that
  tolerates the slower links.

  Slices are found from the devices' `slice_index` (TPU multi-slice), else from their
  processes (one process per slice, e.g. GPU hosts), else (fake CPU devices in one process) as
  consecutive blocks of `devices`, so that the layout is testable anywhere.

  Args:
    shape: mesh axis name -> size, e.g. {"data": -1, "fsdp": 1, "tensor": 1}; within one
      slice when `dcn_shape` is given.
    devices: defaults to all devices of all processes.
    dcn_shape: mesh axis name -> number of slices along it (no -1); None or all ones for a
      single-slice mesh.

  Raises:
    ValueError: naming the config key when the sizes do not divide the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = _resolve_dcn(dcn_shape, len(devices))
  if math.prod(dcn) == 1:
    device_array = _device_array(devices, _resolve_sizes(shape, len(devices), "config.mesh"))
  else:
    per_slice = len(devices) // math.prod(dcn)
    ici = _resolve_sizes(shape, per_slice, f"config.mesh (per slice, config.mesh_dcn="
                                           f"{dict(dcn_shape)})")
    device_array = _hybrid_device_array(devices, ici, dcn)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of config.mesh and (multi-slice) config.mesh_dcn, over `devices`."""
  return make_mesh(config.mesh, devices, dcn_shape=config.get("mesh_dcn"))


def _resolve_dcn(dcn_shape: Mapping[str, int] | None, num_devices: int) -> list[int]:
  if not dcn_shape:
    return [1] * len(MESH_AXES)
  dcn = _axis_sizes(dcn_shape, "config.mesh_dcn")
  if any(s < 1 for s in dcn):
    raise ValueError(f"config.mesh_dcn={dict(dcn_shape)}: sizes must be positive (the number "
                     f"of slices along each axis; -1 is not allowed here)")
  if num_devices % math.prod(dcn):
    raise ValueError(
        f"config.mesh_dcn={dict(dcn_shape)} asks for {math.prod(dcn)} slices, which does not "
        f"divide the {num_devices} devices; set config.mesh_dcn to the job's number of slices")
  return dcn


def _slices(devices: list[jax.Device], num_slices: int
            ) -> tuple[str, list[list[jax.Device]]] | None:
  """(attribute, `devices` grouped by it): by TPU slice_index, else by process, if either
  gives `num_slices` groups; None when neither tells slices apart."""
  for attr in ("slice_index", "process_index"):
    if all(hasattr(d, attr) for d in devices):
      groups: dict[int, list[jax.Device]] = {}
      for d in devices:
        groups.setdefault(getattr(d, attr), []).append(d)
      if len(groups) == num_slices:
        return attr, [groups[k] for k in sorted(groups)]
      if len(groups) > 1:
        raise ValueError(
            f"config.mesh_dcn asks for {num_slices} slices but the devices span {len(groups)} "
            f"(by {attr}); set config.mesh_dcn to {len(groups)} slices")
  return None


def _hybrid_device_array(devices: list[jax.Device], ici: list[int], dcn: list[int]
                         ) -> np.ndarray:
  num_slices = math.prod(dcn)
  found = _slices(devices, num_slices)
  if found is not None and found[0] == "slice_index":
    # TPU slices: mesh_utils also orders the devices within each slice by the physical torus.
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  if found is not None:
    slices = found[1]  # One process per slice.
  else:
    # One process with no slice information (fake CPU devices): consecutive blocks stand
    # in for slices.
    per_slice = len(devices) // num_slices
    slices = [devices[i * per_slice:(i + 1) * per_slice] for i in range(num_slices)]
  blocks = np.stack([_device_array(s, ici) for s in slices]).reshape(dcn + ici)
  # (d0, d1, d2, i0, i1, i2) -> (d0, i0, d1, i1, d2, i2) -> (d0*i0, d1*i1, d2*i2): each axis
  # slice-major, the layout create_hybrid_device_mesh gives.
  n = len(MESH_AXES)
  order = [k for axis in range(n) for k in (axis, n + axis)]
  return blocks.transpose(order).reshape([d * i for d, i in zip(dcn, ici)])


def _device_array(devices: list[jax.Device], sizes: list[int]) -> np.ndarray:
  # mesh_utils orders devices by the physical topology on TPU/GPU; on CPU (or odd counts)
  # it may refuse, and plain order is as good as any.
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    return mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(sizes)


def upgrade_rules(rules: Rules) -> list[list[Any]]:
  """A rules table with the names of older configs (e.g. "batch") renamed to today's."""
  return [[_LEGACY_NAMES.get(name, name), axes] for name, axes in rules]


def rules_of(config: Any) -> tuple[tuple[str, MeshAxes], ...]:
  """config.sharding.rules as a tuple of (logical name, mesh axes) (JSON turns tuples into
  lists; older configs' names are upgraded)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in upgrade_rules(config.sharding.rules))


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> P:
  """Maps logical axis names to a PartitionSpec over mesh axes with `rules`."""
  table = dict(rules)
  axes = []
  used: set[str] = set()
  for name in names:
    if name is None:
      axes.append(None)
      continue
    if name not in table:
      raise KeyError(
          f"logical axis {name!r} has no entry in config.sharding.rules "
          f"(known: {sorted(table)})")
    mesh_axes = table[name]
    flat = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    # A mesh axis may shard only one dimension of an array.
    flat = tuple(a for a in flat if a not in used)
    used.update(flat)
    axes.append(flat[0] if len(flat) == 1 else (flat or None))
  return P(*axes)


def named_sharding(mesh: Mesh, rules: Rules, names: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of the leading (example) axis of every batch entry."""
  return named_sharding(mesh, rules, (BATCH,))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """Shardings for an nnx state from the logical names its Variables carry.

  The result has the structure of `abstract_state` (Variables holding NamedShardings), so it
  can be zipped with the state by jax.tree.map and passed to jit as in/out shardings.
  """
  logical = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(
      lambda spec: named_sharding(mesh, rules, tuple(spec)), logical,
      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fit_spec_to_shape(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """Drops mesh axes from dimensions they do not divide (e.g. a small bias under FSDP)."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for i, axes in enumerate(spec):
    if axes is None:
      continue
    flat = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(sharding.mesh.shape[a] for a in flat)
    if shape[i] % size:
      spec[i] = None
  return NamedSharding(sharding.mesh, P(*spec))


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Bytes of the arrays of `tree` that each device holds (their addressable shards)."""
  held: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def check_split(abstract_state: Any, mesh: Mesh, rules: Rules) -> None:
  """Raises ValueError, naming the mesh keys, when a sharded mesh axis does not divide the
  dimension it is meant to split in most (by bytes) of the weights that carry it.

  `fit_spec_to_shape` replicates a dimension an axis does not divide (a small bias is
  fine), so an axis that divides none of, say, the attention heads would cost devices and
  communication and save no memory.
  """
  logical = nnx.get_partition_spec(abstract_state)
  bytes_by_name: dict[str, collections.Counter] = {}
  for x, names in zip(jax.tree.leaves(abstract_state),
                      jax.tree.leaves(logical, is_leaf=lambda v: isinstance(v, P))):
    for dim, name in zip(x.shape, tuple(names)):
      if name is not None and math.prod(mesh.shape[a] for a in _axes_of(rules, name)) > 1:
        bytes_by_name.setdefault(name, collections.Counter())[dim] += x.size * x.dtype.itemsize
  for name, by_dim in bytes_by_name.items():
    axes = _axes_of(rules, name)
    size = math.prod(mesh.shape[a] for a in axes)
    unsplit = sum(b for dim, b in by_dim.items() if dim % size)
    if 2 * unsplit > sum(by_dim.values()):
      dim = max(by_dim, key=by_dim.get)  # The size that holds most of those bytes.
      divisors = [d for d in range(1, dim + 1) if dim % d == 0]
      mesh_keys = " x ".join(f"config.mesh.{a}" for a in axes)
      raise ValueError(
          f"{mesh_keys} = {size} does not divide the {name!r} axis of the weights "
          f"({', '.join(str(d) for d in sorted(by_dim))}), so it would not be split; choose "
          f"{mesh_keys} among {divisors} (or put the other devices on config.mesh.data)")


# Active (mesh, rules) for activation constraints inside model code.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "genie_jax_sharding", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within this context (while tracing), `constrain` shards activations on `mesh`."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains activation `x` to the sharding its logical `names` map to; a no-op outside
  `activation_rules` (e.g. in single-device tests and eager code)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of shape {x.shape}")
  mesh, rules = active
  sharding = fit_spec_to_shape(named_sharding(mesh, rules, names), x.shape)
  return jax.lax.with_sharding_constraint(x, sharding)
