"""First-order inner solvers on L_σ(θ, Z; λ) through optax (`lbfgs`, `adam`).

They minimise the augmented Lagrangian itself (not its Gauss–Newton model),
over weights and states jointly, and stop by the same rule as every inner
solver (‖∇L_σ‖ ≤ ε_k or the step cap). The optimiser's state is reset when
the subproblem changes, since λ and σ change the objective.

References: D. C. Liu, J. Nocedal, "On the limited memory BFGS method for
large scale optimization", Math. Prog. 45 (1989); D. P. Kingma, J. Ba,
"Adam", ICLR 2015.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from .._checks import check_int, check_positive
from .._lifted import augmented_lagrangian_stacked
from ._base import InnerResult, InnerSolver, Problem, all_finite, tree_where


def _objective(pb: Problem):
    def value(u):
        p, z = u
        return augmented_lagrangian_stacked(p, z, pb.spec, pb.x, pb.y, pb.multipliers, pb.sigma)

    return value


def _standard_promotion(fn):
    # optax mixes int32 and int64 counters under x64, which strict promotion
    # (as in this project's tests, or a user's) rejects.
    def wrapped(*args):
        with jax.numpy_dtype_promotion("standard"):
            return fn(*args)

    return wrapped


def _optax_solver(name, opt: optax.GradientTransformationExtraArgs, max_steps, step_size, line_search):
    @_standard_promotion
    def init(params, Z, pb: Problem):
        return opt.init((params, Z))

    def restart(s, params, Z, pb: Problem):
        return init(params, Z, pb)

    @_standard_promotion
    def step(params, Z, s, pb: Problem):
        value_fn = _objective(pb)
        u = (params, Z)
        f0, g = jax.value_and_grad(value_fn)(u)
        if line_search:
            upd, s1 = opt.update(g, s, u, value=f0, grad=g, value_fn=value_fn)
        else:
            upd, s1 = opt.update(g, s, u)
        u1 = optax.apply_updates(u, upd)
        f1 = value_fn(u1)
        ok = all_finite(u1) & jnp.isfinite(f1)
        if line_search:
            ok = ok & (f1 <= f0)
        s = tree_where(ok, s1, s)
        params, Z = tree_where(ok, u1, u)
        return InnerResult(params, Z, s, ok, jnp.asarray(step_size, f0.dtype))

    return InnerSolver(name, init, restart, step, max_steps)


def lbfgs(*, memory_size: int = 10, max_steps: int = 20) -> InnerSolver:
    """L-BFGS on the augmented Lagrangian (optax.lbfgs with its zoom line search)."""
    memory_size = check_int("memory_size", memory_size)
    max_steps = check_int("max_steps", max_steps)
    return _optax_solver("lbfgs", optax.lbfgs(memory_size=memory_size), max_steps, jnp.nan, True)


def adam(*, learning_rate: float = 1e-3, max_steps: int = 50) -> InnerSolver:
    """Full-batch Adam on the augmented Lagrangian (optax.adam)."""
    check_positive("learning_rate", learning_rate)
    max_steps = check_int("max_steps", max_steps)
    return _optax_solver("adam", optax.adam(learning_rate), max_steps, learning_rate, False)
