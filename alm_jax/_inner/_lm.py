"""Levenberg–Marquardt iteration on the ALM subproblem min ½‖F_σ(θ, Z)‖².

One iteration: the exact structured step with damping μ on the weights and
ratio·μ on the states, the gain ratio

    ρ = (f(x) − f(x + d)) / (f(x) − ½‖r + J d‖²)

and Nielsen's damping update: on success (ρ > η) μ ← μ·max(1/3, 1 − (2ρ−1)³),
ν ← 2; on failure μ ← νμ, ν ← 2ν. A trial point with a non-finite step or
objective is rejected like any failed step.

References:
    H. B. Nielsen, "Damping parameter in Marquardt's method", IMM-REP-1999-05;
    K. Madsen, H. B. Nielsen, O. Tingleff, *Methods for Non-Linear Least
    Squares Problems*, 2004, §3.2.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._lifted import lifted_residual
from .._linalg import structured_step
from .._linalg._linearise import linearise


class LMOptions(NamedTuple):
    state_damping_ratio: float = 1e-6
    accept_ratio: float = 1e-4
    damping_min: float = 1e-12
    damping_max: float = 1e12
    chunk_size: int | None = None


class LMResult(NamedTuple):
    params: object
    states: jnp.ndarray
    damping: jnp.ndarray
    nu: jnp.ndarray
    accepted: jnp.ndarray
    objective: jnp.ndarray  # ½‖F_σ‖² at the returned point


def _tree_add(a, b):
    return jax.tree_util.tree_map(lambda u, v: u + v, a, b)


def _tree_where(c, a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.where(c, u, v), a, b)


def _all_finite(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def initial_damping(params, spec, x, y, Z, Lam, sigma, tau=1e-3):
    """μ_0 = τ·max diag(J_θᵀJ_θ), the usual Levenberg–Marquardt start."""
    lin = linearise(params, spec, x, y, Z, Lam, sigma)
    d_in = jnp.einsum("ma,mk->ak", lin.c_h[0] ** 2, lin.zt_in**2)
    d_hid = jnp.einsum("gma,gmk->gak", lin.c_h[1:] ** 2, lin.zt_hid**2)
    d_out = jnp.einsum("ma,mk->ak", lin.c_o**2, lin.zt_out**2)
    top = jnp.maximum(jnp.max(d_in), jnp.max(d_out))
    if d_hid.size:
        top = jnp.maximum(top, jnp.max(d_hid))
    return tau * jnp.maximum(top, jnp.finfo(top.dtype).tiny)


def lm_iteration(params, Z, spec, x, y, Lam, sigma, damping, nu, opts: LMOptions) -> LMResult:
    def res(p, z):
        return lifted_residual(p, z, spec, x, y, Lam, sigma)

    r0 = res(params, Z)
    f0 = 0.5 * jnp.sum(r0 * r0)
    dp, dz = structured_step(
        params, spec, x, y, Z, Lam, sigma, damping, opts.state_damping_ratio * damping, opts.chunk_size
    )
    _, jd = jax.jvp(res, (params, Z), (dp, dz))
    pred = f0 - 0.5 * jnp.sum((r0 + jd) ** 2)
    p1, z1 = _tree_add(params, dp), Z + dz
    r1 = res(p1, z1)
    f1 = 0.5 * jnp.sum(r1 * r1)
    rho = (f0 - f1) / jnp.where(pred > 0, pred, 1)
    ok = _all_finite((dp, dz)) & jnp.isfinite(f1) & (pred > 0) & (rho > opts.accept_ratio)

    shrink = jnp.maximum(1 / 3, 1 - (2 * rho - 1) ** 3)
    new_damping = jnp.where(ok, damping * shrink, damping * nu)
    new_damping = jnp.clip(new_damping, opts.damping_min, opts.damping_max)
    new_nu = jnp.where(ok, 2 * jnp.ones_like(nu), 2 * nu)
    params = _tree_where(ok, p1, params)
    Z = jnp.where(ok, z1, Z)
    return LMResult(params, Z, new_damping, new_nu, ok, jnp.where(ok, f1, f0))
