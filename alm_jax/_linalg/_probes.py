"""Fixed Rademacher probe vectors that compile in milliseconds.

`jax.random.rademacher` lowers to the threefry block cipher, whose unrolled
rounds took 0.6 s of XLA:CPU compilation per call (shape (4, 1, 927, 50)),
about a tenth of a whole `update`, for probes that never change between
calls. A ±1 pattern from an integer hash of the element index
(lowbias32: two multiplies and three xor-shifts, C. Wellons, "Hash function
prospector", 2018) is as good a probe for the trace and diagonal estimates
it feeds, and is a handful of elementwise ops.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _lowbias32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def rademacher(shape: tuple[int, ...], dtype, salt: int = 0):
    """A deterministic array of ±1 of `shape`, independent-looking across elements and salts."""
    size = 1
    for s in shape:
        size *= s
    idx = lax.iota(jnp.uint32, size) + jnp.uint32((salt * 0x9E3779B9) & 0xFFFFFFFF)
    bits = _lowbias32(_lowbias32(idx)) >> 31
    return (1 - 2 * bits.astype(jnp.int32)).astype(dtype).reshape(shape)
