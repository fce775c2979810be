"""Dense reference step: `lstsq` on the full lifted Jacobian (tiny problems only).

Forms J = ∂r/∂(θ, Z) with `jax.jacfwd` and solves

    min_d ‖[J; √μ] d + [r; 0]‖²

with `jnp.linalg.lstsq`. It costs O((m·n_r)·(P + m·n_u)²) and exists to check
the structured solvers, not to be used for training.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._chain import ChainSpec, DenseParams
from .._lifted import lifted_residual


@functools.partial(jax.jit, static_argnames=("spec",))
def dense_step(params: DenseParams, spec: ChainSpec, x, y, Z, Lam, sigma, mu_w, mu_z):
    flat, unravel = ravel_pytree((params, Z))
    n_theta = ravel_pytree(params)[0].size

    def res(v):
        p, z = unravel(v)
        return lifted_residual(p, z, spec, x, y, Lam, sigma)

    r = res(flat)
    jac = jax.jacfwd(res)(flat)
    damp = jnp.concatenate(
        [jnp.full((n_theta,), mu_w, flat.dtype), jnp.full((flat.size - n_theta,), mu_z, flat.dtype)]
    )
    a = jnp.concatenate([jac, jnp.diag(jnp.sqrt(damp))], axis=0)
    b = jnp.concatenate([-r, jnp.zeros_like(flat)])
    d = jnp.linalg.lstsq(a, b)[0]
    return unravel(d)
