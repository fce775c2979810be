"""Small random lifted problems shared by the tests."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

import alm_jax
from alm_jax._lifted import constraints_stacked, total_loss


class Problem(NamedTuple):
    model: object
    states: tuple
    multipliers: tuple
    x: jax.Array
    y: jax.Array


def make_problem(depth=2, width=4, n_in=3, n_out=1, m=6, bias=True, final_bias=None, act=jnp.tanh,
                 final_act=lambda z: z, scan=False, seed=0, perturb=0.3, dtype=jnp.float64) -> Problem:
    k = jax.random.split(jax.random.key(seed), 5)
    final_bias = bias if final_bias is None else final_bias
    model = eqx.nn.MLP(n_in, n_out, width, depth, activation=act, final_activation=final_act,
                       use_bias=bias, use_final_bias=final_bias, scan=scan, dtype=dtype, key=k[0])
    in_shape = (m,) if n_in == "scalar" else (m, n_in)
    out_shape = (m,) if n_out == "scalar" else (m, n_out)
    x = jax.random.normal(k[1], in_shape, dtype)
    y = jax.random.normal(k[2], out_shape, dtype)
    states = alm_jax.forward_states(model, x)
    noise = jax.random.split(k[3], depth)
    states = tuple(s + perturb * jax.random.normal(kk, s.shape, dtype) for s, kk in zip(states, noise))
    lam_keys = jax.random.split(k[4], depth)
    multipliers = tuple(jax.random.normal(kk, s.shape, dtype) for s, kk in zip(states, lam_keys))
    return Problem(model, states, multipliers, x, y)


def lagrangian_state_gradient(params, spec, x, y, Z, lam):
    """∇_Z(Σℓ + ⟨λ, h⟩) by reverse mode through the lifted constraints (a reference for the adjoint multipliers)."""
    def lagrangian(Z_):
        return total_loss(params, spec, Z_, y) + jnp.sum(lam * constraints_stacked(params, spec, x, Z_))

    return jax.grad(lagrangian)(Z)
