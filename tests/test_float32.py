"""float32 accuracy of the exact structured step, against the float64 step."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import alm_jax
from alm_jax._chain import mlp_to_chain
from alm_jax._linalg._schur import reduced_system

from _problems import make_problem

EPS32 = float(jnp.finfo(jnp.float32).eps)


def _cast(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, tree)


def _scaled_condition(p, beta, mu, mu_z):
    """Condition number of the unit-diagonal-scaled S + μI that the solver factors (float64)."""
    params, spec = mlp_to_chain(p.model)
    assemble = jax.jit(reduced_system, static_argnums=1)
    s, _, _ = assemble(params, spec, p.x, p.y, jnp.stack(p.states), jnp.stack(p.multipliers), beta, mu_z)
    s = np.asarray(s) + mu * np.eye(s.shape[0])
    d = 1 / np.sqrt(np.diag(s))
    w = np.linalg.eigvalsh(d[:, None] * s * d[None, :])
    return w.max() / w.min()


CASES = [  # depth, width, m, μ_θ, μ_z: from well conditioned to the condensing limit
    pytest.param(3, 6, 20, 1e-2, 1e-2, marks=pytest.mark.slow),  # well conditioned: test_inner's float32 CG rows
    pytest.param(3, 6, 20, 1e-4, 0.0, marks=pytest.mark.slow),
    pytest.param(2, 8, 200, 1e-6, 0.0, marks=pytest.mark.slow),
    pytest.param(1, 16, 300, 1e-6, 1e-12, marks=pytest.mark.slow),
    (4, 8, 100, 1e-5, 1e-11),
]


@pytest.mark.parametrize("depth, width, m, mu, mu_z", CASES)
def test_float32_error_within_condition_bound(depth, width, m, mu, mu_z):
    """‖d32 − d64‖/‖d64‖ ≤ κ·ε32, κ the condition number of the scaled reduced
    system (measured: 5e-6 at κ = 1e3 up to 0.1 at κ = 1.5e7, each 3–50× under
    the bound)."""
    p = make_problem(depth=depth, width=width, n_out=2, m=m, seed=3)
    d64 = alm_jax.lm_step(*p[:3], p.x, p.y, 2.0, mu, state_damping=mu_z)
    d32 = alm_jax.lm_step(_cast(p.model), _cast(p.states), _cast(p.multipliers), _cast(p.x), _cast(p.y),
                          2.0, mu, state_damping=mu_z)
    v64, v32 = ravel_pytree(d64)[0], ravel_pytree(d32)[0]
    assert v32.dtype == jnp.float32
    err = float(jnp.linalg.norm(v32.astype(jnp.float64) - v64) / jnp.linalg.norm(v64))
    assert err <= _scaled_condition(p, 2.0, mu, mu_z) * EPS32


def test_float32_singular_system_gives_finite_descent_step():
    """With no damping and fewer samples than weights S is singular; in float32
    the Cholesky factorisation breaks down and the jittered retry must still
    give a finite descent step."""
    p = _cast(make_problem(depth=2, width=8, n_out=2, m=3, seed=3))
    d = alm_jax.lm_step(*p[:3], p.x, p.y, 2.0, 0.0, state_damping=0.0)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(d))
    dmodel, dstates = d
    t = 1e-2  # a short step along d must decrease ‖F_β‖: d is a descent direction

    def objective(model, states):
        r = alm_jax.residual(model, states, p.multipliers, p.x, p.y, 2.0)
        return float(jnp.sum(r.astype(jnp.float64) ** 2))

    scaled = jax.tree_util.tree_map(lambda a: t * a, dmodel)
    moved = tuple(s + t * ds for s, ds in zip(p.states, dstates))
    assert objective(alm_jax.apply_updates(p.model, scaled), moved) < objective(p.model, p.states)


@pytest.mark.parametrize("seed", range(3))
def test_solve_spd_survives_a_round_off_indefinite_system(seed):
    """A rank-deficient S ⪰ 0 in float32 with symmetric relative errors of
    1e-3 (what TF32 products leave; a float32 S assembled on an H100 had a
    diagonal entry of -6e-5) is indefinite: Cholesky breaks down, and a
    single retry at √ε failed on all of 40 such matrices. The escalating
    shifts must give a finite descent direction."""
    from alm_jax._linalg._schur import solve_spd

    rng = np.random.default_rng(seed)
    g_fac = rng.normal(size=(30, 10)) * np.logspace(-3, 1, 30)[:, None]
    s = g_fac @ g_fac.T
    sd = np.sqrt(np.diag(s))
    e = rng.normal(size=s.shape)
    s = jnp.asarray(s + 1e-3 * sd[:, None] * sd[None, :] * (e + e.T) / 2, jnp.float32)
    g = jnp.asarray(g_fac @ rng.normal(size=10), jnp.float32)
    d = 1 / jnp.sqrt(jnp.abs(jnp.diagonal(s)))
    scaled = d[:, None] * s * d[None, :]
    assert not bool(jnp.all(jnp.isfinite(jnp.linalg.cholesky(scaled))))  # the retries are exercised
    x = solve_spd(s, g, jnp.zeros((), jnp.float32))
    assert bool(jnp.all(jnp.isfinite(x)))
    assert float(g @ x) > 0


def _dot_precisions(fn, *args):
    text = str(jax.make_jaxpr(fn)(*args))
    return text.count("dot_general["), set(re.findall(r"precision=(\([^)]*\))", text))


@pytest.mark.parametrize("inner", ["cg", "lm"])
def test_solver_multiplies_in_full_precision(inner):
    """On GPUs JAX multiplies float32 in TF32 unless told otherwise; with TF32
    the float32 structured step missed its κ·ε₃₂ bound on an H100. Every
    product the update traces must carry HIGHEST by default, none with
    matmul_precision=None."""
    p = _cast(make_problem(depth=2, width=4, n_out=1, m=10, seed=0))
    for precision, expected in (("highest", {"(Precision.HIGHEST, Precision.HIGHEST)"}), (None, set())):
        solver = alm_jax.alm(inner=inner, matmul_precision=precision)
        state = solver.init(p.model, p.x, p.y)
        count, found = _dot_precisions(solver.update, state, p.x, p.y)
        assert count > 10 and found == expected
    step = lambda states, lam, x, y: alm_jax.lm_step(p.model, states, lam, x, y, 2.0, 1e-2)  # noqa: E731
    count, found = _dot_precisions(step, p.states, p.multipliers, p.x, p.y)
    assert count > 10 and found == {"(Precision.HIGHEST, Precision.HIGHEST)"}
