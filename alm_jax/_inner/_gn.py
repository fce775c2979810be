"""Gauss–Newton with an Armijo backtracking line search on the ALM subproblem (`gn`).

    d  = argmin ‖J d + r‖² + μ‖dθ‖² + ratio·μ‖dZ‖²     (the exact structured step)
    x ← x + α d,  α = 2^−k the first with f(x + αd) ≤ f(x) + c·α·∇fᵀd

μ is a small regularisation that keeps the reduced system positive definite
(dead units make J_θᵀPJ_θ singular); it is divided by 10 after a full step and
multiplied by 10 when the search fails, which is then a rejected iteration.

Reference: Nocedal & Wright, *Numerical Optimization*, 2nd ed., §10.3 and
Algorithm 3.1 (backtracking).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._checks import check_int, check_positive
from .._lifted import lifted_residual, merit
from .._linalg import structured_step
from ._base import InnerResult, InnerSolver, Problem, all_finite, keep, tree_add, tree_where
from ._lm import initial_damping


class GNState(NamedTuple):
    regularisation: jnp.ndarray


def gn(*, state_damping_ratio: float = 1e-6, regularisation: float = 1e-6, armijo: float = 1e-4,
       max_backtracks: int = 20, chunk_size: int | None = None, max_steps: int = 3) -> InnerSolver:
    """Gauss–Newton with the exact structured step and Armijo backtracking.

    Args:
        state_damping_ratio: damping of the states relative to the weights.
        regularisation: initial μ relative to max diag(J_θᵀJ_θ).
        armijo: sufficient-decrease constant c.
        max_backtracks: halvings of α before the iteration is rejected.
        chunk_size: samples per chunk of the reduced-system assembly.
        max_steps: default iterations per subproblem.
    """
    check_positive("state_damping_ratio", state_damping_ratio, allow_zero=True)
    check_positive("regularisation", regularisation)
    check_positive("armijo", armijo, below=0.5)
    max_backtracks = check_int("max_backtracks", max_backtracks)
    chunk_size = check_int("chunk_size", chunk_size, allow_none=True)
    max_steps = check_int("max_steps", max_steps)

    def init(params, Z, pb: Problem):
        return GNState(initial_damping(params, pb.spec, pb.x, pb.y, Z, pb.multipliers, pb.sigma,
                                       tau=regularisation))

    def step(params, Z, s: GNState, pb: Problem):
        def f(p, z):
            r = lifted_residual(p, z, pb.spec, pb.x, pb.y, pb.multipliers, pb.sigma)
            return merit(p, z, pb.spec, pb.x, pb.y, pb.multipliers, pb.sigma), r

        f0, r0 = f(params, Z)
        mu = s.regularisation
        dp, dz = structured_step(params, pb.spec, pb.x, pb.y, Z, pb.multipliers, pb.sigma, mu,
                                 state_damping_ratio * mu, chunk_size)
        _, jd = jax.jvp(lambda p, z: f(p, z)[1], (params, Z), (dp, dz))
        slope = jnp.sum(r0 * jd)  # ∇fᵀd

        def trial(alpha):
            return f(tree_add(params, dp, alpha), Z + alpha * dz)[0]

        def cond(c):
            k, alpha, ft = c
            return (k < max_backtracks) & ~(jnp.isfinite(ft) & (ft <= f0 + armijo * alpha * slope))

        def body(c):
            k, alpha, _ = c
            return k + 1, 0.5 * alpha, trial(0.5 * alpha)

        one = jnp.ones_like(f0)
        k, alpha, ft = jax.lax.while_loop(cond, body, (jnp.asarray(0), one, trial(one)))
        ok = all_finite((dp, dz)) & (slope < 0) & jnp.isfinite(ft) & (ft <= f0 + armijo * alpha * slope)
        p1, z1 = tree_add(params, dp, alpha), Z + alpha * dz
        new_mu = jnp.where(ok, jnp.where(k == 0, mu / 10, mu), 10 * mu)
        new_mu = jnp.clip(new_mu, 1e-12, 1e12)
        return InnerResult(tree_where(ok, p1, params), jnp.where(ok, z1, Z), GNState(new_mu), ok, new_mu)

    return InnerSolver("gn", init, keep, step, max_steps)
