"""First-order baselines on the plain (single-shooting) training loss."""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


def train_adam(model, x, y, *, time_budget: float, learning_rate: float = 1e-2, steps_per_call: int = 50):
    """Full-batch Adam on ½·mean‖Φ(x) − y‖² for `time_budget` seconds (compilation included).

    Returns:
        (model, steps, seconds).
    """
    start = time.perf_counter()
    opt = optax.adam(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = opt.init(params)

    def loss(p):
        pred = jax.vmap(eqx.combine(p, static))(x)
        return 0.5 * jnp.mean(jnp.sum((pred.reshape(y.shape) - y) ** 2, axis=-1))

    @jax.jit
    def run(p, s):
        def body(_, carry):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, steps_per_call, body, (p, s))

    run = run.lower(params, opt_state).compile()
    steps = 0
    per_call = 0.0
    while True:
        now = time.perf_counter()
        if now - start + per_call > time_budget:
            break
        params, opt_state = jax.block_until_ready(run(params, opt_state))
        per_call = time.perf_counter() - now
        steps += steps_per_call
    return eqx.combine(params, static), steps, time.perf_counter() - start
