"""Small random lifted problems shared by the tests."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

import alm_jax
from alm_jax._chain import mlp_to_chain
from alm_jax._inner import Problem as Subproblem
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


def subproblem(depth, width, n_out, m=12, sigma=3.0, seed=0, loss="squared", act=jnp.tanh, perturb=0.3,
               multiplier_scale=1.0, bias=True):
    """An ALM subproblem of `make_problem`'s MLP: `(params, spec, Z, alm_jax._inner.Problem)`.

    For cross-entropy y is one-hot over the classes in turn; the multipliers
    are `make_problem`'s times `multiplier_scale`.
    """
    pb = make_problem(depth=depth, width=width, n_out=n_out, m=m, bias=bias, seed=seed, act=act, perturb=perturb)
    params, spec = mlp_to_chain(pb.model)
    spec = dataclasses.replace(spec, loss=alm_jax.losses.get_loss(loss))
    y = pb.y
    if loss == "softmax_cross_entropy":
        y = jax.nn.one_hot(jnp.arange(m) % n_out, n_out, dtype=y.dtype)
    Z, Lam = jnp.stack(pb.states), jnp.stack(pb.multipliers)
    if multiplier_scale != 1.0:
        Lam = multiplier_scale * Lam
    return params, spec, Z, Subproblem(spec, pb.x, y, Lam, jnp.asarray(sigma))


def lagrangian_state_gradient(params, spec, x, y, Z, lam):
    """∇_Z(Σℓ + ⟨λ, h⟩) by reverse mode through the lifted constraints (a reference for the adjoint multipliers)."""
    def lagrangian(Z_):
        return total_loss(params, spec, Z_, y) + jnp.sum(lam * constraints_stacked(params, spec, x, Z_))

    return jax.grad(lagrangian)(Z)
