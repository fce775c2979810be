"""Single-shooting baselines on the plain training loss, each under a wall-clock budget.

Each trainer returns a `BaselineRun` whose history samples the training MSE
over time (compilation included), so methods can be compared at equal
wall-clock as in `python -m alm_jax` and `benchmarks/uci_suite.py`.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


class BaselineRun(NamedTuple):
    model: Any
    steps: int
    seconds: float
    times: list  # seconds since start at each record
    mses: list  # training MSE at each record


def _mse_fn(static, x, y):
    def mse(p):
        pred = jax.vmap(eqx.combine(p, static))(x)
        return jnp.mean((pred.reshape(y.shape) - y) ** 2)

    return mse


def _loop(start, time_budget, run, carry, mse_of, steps_per_call):
    """Call the compiled `run` until the next call would overrun the budget."""
    times, mses, steps, per_call = [], [], 0, 0.0
    while True:
        now = time.perf_counter()
        if now - start + 1.25 * per_call > time_budget:
            break
        carry = jax.block_until_ready(run(*carry))
        per_call = time.perf_counter() - now
        steps += steps_per_call
        times.append(time.perf_counter() - start)
        mses.append(float(mse_of(carry)))
    return carry, steps, times, mses


def train_adam(model, x, y, *, time_budget: float, learning_rate: float = 1e-2,
               steps_per_call: int = 50) -> BaselineRun:
    """Full-batch Adam on ½·mean‖Φ(x) − y‖² (Kingma & Ba 2015)."""
    start = time.perf_counter()
    opt = optax.adam(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    mse = _mse_fn(static, x, y)

    def run(p, s):
        def body(_, c):
            p, s = c
            u, s = opt.update(jax.grad(lambda q: 0.5 * mse(q))(p), s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, steps_per_call, body, (p, s))

    carry = (params, opt.init(params))
    run = jax.jit(run).lower(*carry).compile()
    mse_j = jax.jit(mse)
    carry, steps, times, mses = _loop(start, time_budget, run, carry, lambda c: mse_j(c[0]), steps_per_call)
    return BaselineRun(eqx.combine(carry[0], static), steps, time.perf_counter() - start, times, mses)


def train_lbfgs(model, x, y, *, time_budget: float, steps_per_call: int = 10) -> BaselineRun:
    """Full-batch `optax.lbfgs` with its default zoom line search (Nocedal & Wright Alg. 7.5)."""
    start = time.perf_counter()
    opt = optax.lbfgs()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    mse = _mse_fn(static, x, y)

    def loss(p):
        return 0.5 * mse(p)

    value_and_grad = optax.value_and_grad_from_state(loss)

    def run(p, s):
        def body(_, c):
            p, s = c
            v, g = value_and_grad(p, state=s)
            u, s = opt.update(g, s, p, value=v, grad=g, value_fn=loss)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, steps_per_call, body, (p, s))

    carry = (params, opt.init(params))
    run = jax.jit(run).lower(*carry).compile()
    mse_j = jax.jit(mse)
    carry, steps, times, mses = _loop(start, time_budget, run, carry, lambda c: mse_j(c[0]), steps_per_call)
    return BaselineRun(eqx.combine(carry[0], static), steps, time.perf_counter() - start, times, mses)


def train_optx_lm(model, x, y, *, time_budget: float, steps_per_call: int = 5) -> BaselineRun:
    """Single-shooting Levenberg–Marquardt from optimistix on the residual Φ(x) − y.

    `optx.least_squares` runs to convergence in one call, so to honour the
    budget it is called for `steps_per_call` steps at a time, restarting
    from the last iterate (the damping restarts too).
    """
    import optimistix as optx

    start = time.perf_counter()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    mse = _mse_fn(static, x, y)

    def residual(p, _):
        return (jax.vmap(eqx.combine(p, static))(x).reshape(y.shape) - y).reshape(-1)

    solver = optx.LevenbergMarquardt(rtol=1e-12, atol=1e-12)

    def run(p):
        sol = optx.least_squares(residual, solver, p, max_steps=steps_per_call, throw=False)
        return (sol.value,)

    carry = (params,)
    run = jax.jit(run).lower(*carry).compile()
    mse_j = jax.jit(mse)
    carry, steps, times, mses = _loop(start, time_budget, run, carry, lambda c: mse_j(c[0]), steps_per_call)
    return BaselineRun(eqx.combine(carry[0], static), steps, time.perf_counter() - start, times, mses)
