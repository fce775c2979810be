"""The inner `cg`'s adapted product limit (`adapt_cg_steps`): the rule, the traced limit, the solver state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alm_jax
from alm_jax._inner._lm import adapt_cap
from alm_jax._linalg import matfree_step

from _problems import make_problem, subproblem


def _adapt(limit, rate, steps, accepted, cap_max=100):
    lim, r = adapt_cap((jnp.asarray(limit, jnp.int32), jnp.asarray(rate)), jnp.asarray(steps, jnp.int32),
                       jnp.asarray(accepted), cap_max)
    return int(lim), float(r)


@pytest.mark.parametrize("limit, rate, steps, accepted, cap_max, expect", [
    (100, 0.3, 40, False, 100, (100, 0.3)),  # CG ended on its tolerance: nothing learnt
    (100, 1.0, 100, False, 100, (100, 0.8)),  # one rejection from 1: 0.8, neither bound crossed
    (100, 0.6, 100, False, 100, (50, 0.48)),  # the average falls below 1/2: halve
    (12, 0.4, 12, False, 100, (10, 0.32)),  # halving stops at the floor of 10
    (8, 0.4, 8, False, 8, (8, 0.32)),  # a cap_max below the floor is the floor
    (25, 0.8, 25, True, 100, (50, 0.84)),  # above 4/5: double
    (80, 1.0, 80, True, 100, (100, 1.0)),  # doubling stops at cap_max
    (50, 0.7, 50, True, 100, (50, 0.76)),  # between the bounds: keep
])
def test_adapt_cap_rule(limit, rate, steps, accepted, cap_max, expect):
    got = _adapt(limit, rate, steps, accepted, cap_max)
    assert got[0] == expect[0]
    np.testing.assert_allclose(got[1], expect[1], rtol=1e-12)


def test_one_rejection_does_not_halve_but_a_run_does():
    """From the full limit at rate 1, three rejected capped steps keep it (0.8, 0.64, 0.512) and
    the fourth (0.41) halves it: one unlucky step does not shorten CG."""
    limit, rate = 100, 1.0
    seen = []
    for _ in range(4):
        limit, rate = _adapt(limit, rate, limit, False)
        seen.append(limit)
    assert seen == [100, 100, 100, 50]


@pytest.mark.parametrize("shape", [dict(depth=1, width=5, n_out=2), dict(depth=3, width=4, n_out=1)])
def test_traced_limit_is_the_static_one(shape):
    """A traced `cap` stops CG exactly where the same static `max_steps` does (same iterates)."""
    params, spec, Z, p = subproblem(**shape)
    args = (params, spec, p.x, p.y, Z, p.multipliers, p.sigma, 1e-2, 1e-4, 1e-12)
    dp_s, dz_s, n_s = matfree_step(*args, max_steps=3, precondition=True)
    dp_t, dz_t, n_t = matfree_step(*args, max_steps=100, precondition=True, cap=jnp.asarray(3, jnp.int32))
    assert int(n_s) == int(n_t) == 3
    for a, b in zip(jax.tree_util.tree_leaves((dp_s, dz_s)), jax.tree_util.tree_leaves((dp_t, dz_t))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_solver_carries_the_limit():
    """alm with `adapt_cg_steps` (the default) keeps (limit, rate) in the inner state, starting at
    (max_cg_steps, 1); the limit stays within [10, max_cg_steps] while it trains."""
    pb = make_problem(depth=2, width=6, n_out=1, m=40, seed=2)
    solver = alm_jax.alm(adapt_cg_steps=True, max_cg_steps=40)
    state = solver.init(pb.model, pb.x, pb.y)
    limit, rate = state.inner.cg_cap
    assert int(limit) == 40 and float(rate) == 1.0
    update = jax.jit(solver.update)
    loss0 = None
    for _ in range(30):
        state, info = update(state, pb.x, pb.y)
        loss0 = float(info.loss) if loss0 is None else loss0
        assert 10 <= int(state.inner.cg_cap[0]) <= 40
    assert float(info.loss) < loss0
    off = alm_jax.alm(adapt_cg_steps=False).init(pb.model, pb.x, pb.y)
    assert off.inner.cg_cap is None
    assert alm_jax.alm().init(pb.model, pb.x, pb.y).inner.cg_cap is not None  # the default `cg` adapts
    with pytest.raises(TypeError, match="adapt_cg_steps"):
        alm_jax.alm(inner="lm", adapt_cg_steps=True)  # the exact step has no CG to limit
