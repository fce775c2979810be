"""The interface every inner solver of the augmented Lagrangian subproblem implements.

The subproblem at fixed multipliers λ and penalties σ is

    min_{θ, Z} L_σ(θ, Z; λ) = ½‖F‖² + ⟨λ, h⟩ + ½Σσ_i h_i² = β·½‖F_σ‖² + const,

with F_σ the lifted residual. An `InnerSolver` is three pure functions:

    istate = init(params, Z, problem)                    # first subproblem
    istate = restart(istate, params, Z, problem)         # λ or σ changed
    result = step(params, Z, istate, problem)            # one iteration

`result.accepted` says whether the point moved: a trial with a non-finite
step or objective is never applied.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .._chain import ChainSpec


class Problem(NamedTuple):
    """Data of one subproblem (closed over inside the jitted update, not traced as a pytree)."""

    spec: ChainSpec
    x: Any
    y: Any
    multipliers: Any
    sigma: Any


class InnerResult(NamedTuple):
    params: Any
    states: Any
    state: Any  # the solver's own state
    accepted: Any
    damping: Any  # the solver's damping or step size, for diagnostics (NaN if none)
    # ‖∇L_σ‖ at the point the step started from, where the solver has it
    # for free (None: `alm` computes it).
    grad_norm: Any = None


class InnerSolver(NamedTuple):
    name: str
    init: Callable
    restart: Callable
    step: Callable
    default_max_steps: int  # per subproblem, when `alm(max_inner_steps=None)`
    # The same where the outer step takes the adjoint multipliers; None: `default_max_steps`.
    adjoint_max_steps: int | None = None


def keep(istate, params, Z, problem):
    """`restart` that warm-starts: the state carries over to the next subproblem."""
    return istate


def tree_add(a, b, scale=1.0):
    return jax.tree_util.tree_map(lambda u, v: u + scale * v, a, b)


def tree_where(c, a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.where(c, u, v), a, b)


def all_finite(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


# Nielsen's (1999) largest shrink of μ after one successful step: the
# default of `nielsen`, `lm` and `cg`.
NIELSEN_DECREASE = 1 / 3


def nielsen(ok, rho, damping, nu, lo, hi, decrease=NIELSEN_DECREASE):
    """Nielsen's update: μ·max(c, 1 − (2ρ−1)³), ν ← 2 on success; μ·ν, ν ← 2ν on failure (c = `decrease`, 1/3 in
    Nielsen's rule)."""
    shrink = jnp.maximum(decrease, 1 - (2 * rho - 1) ** 3)
    new = jnp.clip(jnp.where(ok, damping * shrink, damping * nu), lo, hi)
    return new, jnp.where(ok, 2 * jnp.ones_like(nu), 2 * nu)
