"""Data parallelism: samples sharded across devices, weights replicated.

Samples couple only through the weights, so sharding every per-sample array
(data, lifted states, multipliers, per-constraint penalties) along its sample
axis lets XLA's SPMD partitioner run the per-sample eliminations locally and
sum the reduced weight system across devices; the P × P solve is replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._alm import ALMState


def sample_mesh(devices=None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over `devices` (default: all devices) for sharding samples."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (axis_name,))


def _put(a, mesh, axis, axis_name):
    spec = [None] * a.ndim
    if a.shape[axis] % mesh.shape[axis_name]:
        raise ValueError(
            f"the sample count {a.shape[axis]} must be divisible by the {mesh.shape[axis_name]} devices "
            f"of mesh axis {axis_name!r}."
        )
    spec[axis] = axis_name
    return jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))


def shard_samples(mesh: Mesh, x, y, state: ALMState | None = None, axis_name: str = "data"):
    """Shard data (and a solver state) along the sample axis of `mesh`.

    Args:
        mesh: a mesh with an axis `axis_name` (e.g. from `sample_mesh()`).
        x, y: data with samples on axis 0; m must divide evenly by the devices.
        state: optional `ALMState`; its states, multipliers and per-constraint
            penalties are sharded the same way and the weights replicated.

    Returns:
        `(x, y)` or `(x, y, state)`, placed on the mesh. Pass them to a jitted
        `solver.update` as usual: the step is then data parallel.
    """
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name: mesh has no axis {axis_name!r} (axes {tuple(mesh.shape)}).")
    x, y = _put(x, mesh, 0, axis_name), _put(y, mesh, 0, axis_name)
    if state is None:
        return x, y
    replicated = NamedSharding(mesh, PartitionSpec())
    per_sample_shape = state.states.shape  # (N, m, width): states, multipliers, per-constraint policy arrays

    def place(a):
        return _put(a, mesh, 1, axis_name) if np.shape(a) == per_sample_shape else jax.device_put(a, replicated)

    return x, y, jax.tree_util.tree_map(place, state)
