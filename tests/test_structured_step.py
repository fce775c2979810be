"""The structured LM step equals a dense lstsq of the full lifted Jacobian.

The reference is built only from the public `residual` (jax.jacfwd of the
flattened residual) so it shares no code with the structured solver.
Tolerance: relative error ≤ 1e-10 in float64. These problems have condition
numbers of at most ~1e4, so a backward-stable solve is accurate to ~1e-12;
1e-10 leaves two orders of margin while any structural mistake (a missing
block, a wrong sign, a transposed Kronecker factor) gives errors of O(1).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import alm_jax
from _problems import make_problem

RTOL = 1e-10


def dense_reference(prob, beta, mu_w, mu_z):
    params, static = eqx.partition(prob.model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree((params, prob.states))
    n_theta = ravel_pytree(params)[0].size

    @jax.jit
    def solve(flat, multipliers, x, y):
        def res(v):
            p, s = unravel(v)
            return alm_jax.residual(eqx.combine(p, static), s, multipliers, x, y, beta)

        r = res(flat)
        jac = jax.jacfwd(res)(flat)
        damp = jnp.concatenate([jnp.full(n_theta, mu_w), jnp.full(flat.size - n_theta, mu_z)])
        a = jnp.concatenate([jac, jnp.diag(jnp.sqrt(damp))])
        b = jnp.concatenate([-r, jnp.zeros_like(flat)])
        return jnp.linalg.lstsq(a, b)[0]

    return solve(flat, prob.multipliers, prob.x, prob.y), unravel


gelu = jax.nn.gelu
CASES = [
    # depth, width, n_in, n_out, m, bias, activation, mu_w, mu_z, extra
    (1, 4, 3, 1, 7, True, jnp.tanh, 1e-1, 1e-1, {}),
    (1, 5, 2, 2, 6, False, jnp.tanh, 1e-2, 1e-2, {}),
    (1, 3, 4, 3, 9, True, jax.nn.softplus, 1e-3, 1e-9, {}),
    (2, 4, 3, 1, 6, True, jnp.tanh, 1e-1, 1e-3, {}),
    (2, 6, 2, 2, 5, False, jax.nn.sigmoid, 1e-2, 1e-2, {}),
    (2, 3, 5, 3, 8, True, jnp.sin, 1e-3, 0.0, {}),
    (2, 4, 3, 2, 7, True, gelu, 1.0, 1e-6, {"chunk_size": 3}),
    (3, 4, 2, 1, 6, True, jnp.tanh, 1e-2, 1e-2, {}),
    (3, 5, 3, 2, 5, False, jax.nn.softplus, 1e-1, 1e-4, {}),
    (3, 3, 2, 3, 7, True, jnp.tanh, 1e-4, 1e-4, {"scan": True}),
    (3, 4, 4, 1, 9, True, jax.nn.relu, 1e-2, 1e-2, {}),
    (3, 4, 2, 2, 8, True, jnp.tanh, 1e-2, 1e-8, {"chunk_size": 2}),
    (4, 3, 2, 1, 6, True, jnp.tanh, 1e-2, 1e-2, {}),
    (4, 4, 3, 2, 5, False, jnp.tanh, 1e-3, 0.0, {}),
    (4, 5, 2, 3, 6, True, jax.nn.sigmoid, 1e-1, 1e-5, {"scan": True}),
    (4, 3, 3, 1, 7, True, jnp.sin, 1.0, 1e-2, {"final_act": jnp.tanh}),
    (2, 4, "scalar", "scalar", 6, True, jnp.tanh, 1e-2, 1e-3, {}),
    (1, 4, 3, 2, 6, True, jnp.tanh, 1e-2, 1e-2, {"final_bias": False}),
    (3, 4, 3, 1, 6, False, jnp.tanh, 1e-2, 1e-2, {"final_bias": True, "beta": 1e3}),
    (2, 5, 3, 2, 6, True, jnp.tanh, 1e-2, 1e-2, {"beta": 1e-2}),
    (4, 6, 3, 3, 10, True, gelu, 1e-3, 1e-6, {"chunk_size": 4, "final_act": jax.nn.softplus}),
    (1, 2, 1, 1, 3, True, jnp.tanh, 1e-2, 0.0, {}),
    (1, 5, 3, 2, 9, True, jnp.tanh, 1e-2, 1e-4, {"chunk_size": 4}),
    # deeper than _blocktri.UNROLL_MAX_DEPTH: the state sweeps run as scans
    (6, 3, 2, 2, 5, True, jnp.tanh, 1e-2, 1e-3, {}),
]


# Kept out of the default run for its ~10 min, each covered by a neighbour:
# plain tanh rows of depth 1 to 4 (the chunked, bias-free and other-activation
# rows of each depth stay), a depth-2 sigmoid row (sigmoid: row 14), a
# bias-free depth-3 softplus row (softplus: 2, bias-free: 1 and 13), a
# depth-3 scan row (scan: 14), a depth-4 sin row with a final tanh (sin: 5,
# a final activation: 20), a small penalty (row 18: a large one).
_SLOW_ROWS = {0, 3, 4, 7, 8, 9, 12, 15, 19}


@pytest.mark.parametrize("case", [pytest.param(c, id=f"case{i}", marks=pytest.mark.slow if i in _SLOW_ROWS else ())
                                  for i, c in enumerate(CASES)])
def test_lm_step_matches_dense_lstsq(case):
    depth, width, n_in, n_out, m, bias, act, mu_w, mu_z, extra = case
    extra = dict(extra)
    chunk = extra.pop("chunk_size", None)
    beta = extra.pop("beta", 3.0)
    prob = make_problem(depth=depth, width=width, n_in=n_in, n_out=n_out, m=m, bias=bias, act=act,
                        seed=len(str(case)), **extra)
    ref, unravel = dense_reference(prob, beta, mu_w, mu_z)
    dmodel, dstates = alm_jax.lm_step(prob.model, prob.states, prob.multipliers, prob.x, prob.y, beta,
                                      mu_w, state_damping=mu_z, chunk_size=chunk)
    got = ravel_pytree((dmodel, dstates))[0]
    assert got.shape == ref.shape
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert err <= RTOL, err


def test_lm_step_output_structure_and_jit():
    prob = make_problem(depth=3, width=4, n_out=2, m=5)
    step = eqx.filter_jit(alm_jax.lm_step)
    dmodel, dstates = step(prob.model, prob.states, prob.multipliers, prob.x, prob.y, 2.0, 1e-2)
    like = eqx.filter(prob.model, eqx.is_inexact_array)
    assert jax.tree_util.tree_structure(dmodel) == jax.tree_util.tree_structure(like)
    for a, b in zip(jax.tree_util.tree_leaves(dmodel), jax.tree_util.tree_leaves(like)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert len(dstates) == 3 and all(d.shape == s.shape for d, s in zip(dstates, prob.states))
    eager = alm_jax.lm_step(prob.model, prob.states, prob.multipliers, prob.x, prob.y, 2.0, 1e-2)
    np.testing.assert_allclose(ravel_pytree(eager)[0], ravel_pytree((dmodel, dstates))[0], rtol=1e-12)


def test_lm_step_decreases_linear_model():
    """The step solves the damped model problem: ‖J d + r‖² + μ‖d‖² < ‖r‖²."""
    prob = make_problem(depth=2, width=5, m=8)
    beta, mu = 4.0, 1e-2
    d = alm_jax.lm_step(prob.model, prob.states, prob.multipliers, prob.x, prob.y, beta, mu)
    params, static = eqx.partition(prob.model, eqx.is_inexact_array)

    def res(p, s):
        return alm_jax.residual(eqx.combine(p, static), s, prob.multipliers, prob.x, prob.y, beta)

    r, jd = jax.jvp(res, (params, prob.states), d)
    model_value = jnp.sum((r + jd) ** 2) + mu * jnp.sum(ravel_pytree(d)[0] ** 2)
    assert model_value < jnp.sum(r**2)


