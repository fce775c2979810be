"""Single-shooting baselines on the plain training loss, each under a wall-clock budget.

Each trainer returns a `BaselineRun` whose history samples the training MSE
(and the training loss) over time, compilation included, so methods can be
compared at equal wall-clock as in `python -m alm_jax` and `benchmarks/`.
`train_adam` and `train_lbfgs` take the same `loss` as `alm_jax.alm`.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._inner._base import tree_where
from ._losses import get_loss


class BaselineRun(NamedTuple):
    model: Any
    steps: int
    seconds: float
    times: list  # seconds since start at each record
    mses: list  # training MSE of the predictions at each record
    losses: list | tuple = ()  # mean training loss at each record


def _predict(static, x, y):
    def predict(p):
        return jax.vmap(eqx.combine(p, static))(x).reshape(y.shape)

    return predict


def _run_budgeted(start, time_budget, run, carry, static, x, y, steps_per_call, loss) -> BaselineRun:
    """Compile `run` (carry → carry, weights first), then call it until the next
    call would overrun the budget, recording the training MSE and loss after each call."""
    predict = _predict(static, x, y)

    def metrics(p):
        out = predict(p)
        return jnp.mean((loss.predict(out) - y) ** 2), jnp.mean(loss.value(out, y))

    # Both compiled before the loop, so that the per-call time the stopping
    # rule extrapolates from holds no compilation.
    run = jax.jit(run).lower(*carry).compile()
    metrics = jax.jit(metrics).lower(carry[0]).compile()
    times, mses, losses, steps, per_call = [], [], [], 0, 0.0
    while True:
        now = time.perf_counter()
        if now - start + 1.25 * per_call > time_budget:
            break
        carry = jax.block_until_ready(run(*carry))
        steps += steps_per_call
        times.append(time.perf_counter() - start)
        mse, value = metrics(carry[0])
        mses.append(float(mse))
        losses.append(float(value))
        per_call = time.perf_counter() - now
    return BaselineRun(eqx.combine(carry[0], static), steps, time.perf_counter() - start, times, mses, losses)


def _optax_budgeted(opt, update, model, x, y, time_budget, steps_per_call, loss) -> BaselineRun:
    """Full-batch optax loop: `update(p, s, objective) -> (updates, s)`, `steps_per_call` per compiled call."""
    start = time.perf_counter()
    loss = get_loss(loss)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    predict = _predict(static, x, y)

    def objective(p):
        return jnp.mean(loss.value(predict(p), y))

    def run(p, s):
        def body(_, c):
            u, s = update(c[0], c[1], objective)
            return optax.apply_updates(c[0], u), s

        return jax.lax.fori_loop(0, steps_per_call, body, (p, s))

    return _run_budgeted(start, time_budget, run, (params, opt.init(params)), static, x, y, steps_per_call, loss)


def train_adam(model, x, y, *, time_budget: float, learning_rate: float = 1e-2,
               steps_per_call: int = 50, loss="squared") -> BaselineRun:
    """Full-batch Adam on mean ℓ(Φ(x), y) (½‖·‖² by default; Kingma & Ba 2015)."""
    opt = optax.adam(learning_rate)

    def update(p, s, objective):
        return opt.update(jax.grad(objective)(p), s, p)

    return _optax_budgeted(opt, update, model, x, y, time_budget, steps_per_call, loss)


def train_lbfgs(model, x, y, *, time_budget: float, steps_per_call: int = 10, loss="squared",
                gtol: float = 1e-12) -> BaselineRun:
    """Full-batch `optax.lbfgs` with its default zoom line search (Nocedal & Wright Alg. 7.5).

    Steps stop once ‖∇f‖ ≤ gtol, as in optax's own L-BFGS loop. Without
    the stop, cross-entropy on separable data (300 digits, 64-8-10) fell to
    0 and L-BFGS then stepped to a loss of 9.6e17 along the growing weights.
    """
    opt = optax.lbfgs()

    def update(p, s, objective):
        v, g = optax.value_and_grad_from_state(objective)(p, state=s)
        u, s_new = opt.update(g, s, p, value=v, grad=g, value_fn=objective)
        done = optax.tree_utils.tree_norm(g) <= gtol
        return tree_where(done, optax.tree_utils.tree_zeros_like(u), u), tree_where(done, s, s_new)

    return _optax_budgeted(opt, update, model, x, y, time_budget, steps_per_call, loss)


def train_optx_lm(model, x, y, *, time_budget: float, steps_per_call: int = 5) -> BaselineRun:
    """Single-shooting Levenberg–Marquardt from optimistix on the residual Φ(x) − y.

    `optx.least_squares` runs to convergence in one call, so to honour the
    budget it is called for `steps_per_call` steps at a time, restarting
    from the last iterate (the damping restarts too).
    """
    import optimistix as optx

    start = time.perf_counter()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    predict = _predict(static, x, y)
    solver = optx.LevenbergMarquardt(rtol=1e-12, atol=1e-12)

    def run(p):
        sol = optx.least_squares(lambda q, _: (predict(q) - y).reshape(-1), solver, p,
                                 max_steps=steps_per_call, throw=False)
        return (sol.value,)

    return _run_budgeted(start, time_budget, run, (params,), static, x, y, steps_per_call, get_loss("squared"))
