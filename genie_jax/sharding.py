"""Device mesh and sharding by logical axis names.

Every parameter and key activation names its axes with logical names ("embed", "mlp",
"batch", ...). One rules table, taken from the config, maps each logical name to mesh axes, so
the same model runs data parallel, FSDP or tensor parallel depending only on the mesh shape and
the rules. A logical name missing from the rules is an error, never a silent replication.

Parameters and activations use different names for the model width ("embed" vs "act_embed")
because FSDP shards the width of parameters over the same mesh axis that shards the batch of
activations.
"""

from __future__ import annotations

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

# Mesh axis order: outermost (slowest interconnect) first.
MESH_AXES = ("data", "fsdp", "tensor")

# Defaults that make DP, FSDP and TP a matter of the mesh shape alone.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("time", None),
    ("tokens", None),
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

def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh with axes `MESH_AXES`; one size may be -1 (the remaining devices).

  Args:
    shape: mesh axis name -> size, e.g. {"data": -1, "fsdp": 1, "tensor": 1}.
    devices: defaults to all devices of all processes.

  Raises:
    ValueError: naming the config key when the sizes do not divide the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES}")
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(shape)}")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or len(devices) % known:
    raise ValueError(
        f"config.mesh={dict(shape)} needs a multiple of {known} devices, but there are "
        f"{len(devices)}; change config.mesh so that the product of its sizes divides "
        f"{len(devices)} (use -1 for one axis to take the rest).")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"config.mesh={dict(shape)} uses {math.prod(sizes)} devices but there are "
        f"{len(devices)}; set one axis to -1 or make the sizes multiply to {len(devices)}.")
  device_array = _device_array(devices, sizes)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _device_array(devices: list[jax.Device], sizes: list[int]) -> np.ndarray:
  # mesh_utils orders devices by the physical topology on TPU/GPU; on CPU (or odd counts)
  # it may refuse, and plain order is as good as any.
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    return mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(sizes)


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
