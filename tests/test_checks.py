"""Bad input gets a clear error naming the argument, before any compilation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alm_jax
from _problems import make_problem


@pytest.fixture(scope="module")
def prob():
    return make_problem(depth=2, width=4, n_in=3, n_out=2, m=5)


def call_step(prob, **over):
    args = dict(model=prob.model, states=prob.states, multipliers=prob.multipliers, x=prob.x, y=prob.y,
                beta=2.0, damping=1e-2)
    args.update(over)
    return alm_jax.lm_step(**args)


BAD_STEP_INPUTS = [
    ({"x": jnp.ones((5, 4))}, ValueError, "x"),
    ({"x": jnp.ones((5, 3, 1))}, ValueError, "x"),
    ({"y": jnp.ones((5, 3))}, ValueError, "y"),
    ({"y": jnp.ones((6, 2))}, ValueError, "x and y"),
    ({"y": jnp.ones((5,))}, ValueError, "y"),
    ({"x": jnp.ones((0, 3)), "y": jnp.ones((0, 2))}, ValueError, "x"),
    ({"x": jnp.ones((5, 3), jnp.int32)}, TypeError, "x"),
    ({"y": np.ones((5, 2), bool)}, TypeError, "y"),
    ({"x": jnp.full((5, 3), jnp.nan)}, ValueError, "x"),
    ({"y": jnp.full((5, 2), jnp.inf)}, ValueError, "y"),
    ({"beta": -1.0}, ValueError, "beta"),
    ({"beta": 0.0}, ValueError, "beta"),
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"damping": -1e-3}, ValueError, "damping"),
    ({"damping": "big"}, TypeError, "damping"),
    ({"states": "nope"}, TypeError, "states"),
    ({"multipliers": (jnp.ones((5, 4)),)}, ValueError, "multipliers"),
    ({"states": (jnp.ones((5, 4)), jnp.ones((5, 5)))}, ValueError, r"states\[1\]"),
    ({"states": (jnp.ones((5, 4)), jnp.full((5, 4), jnp.nan))}, ValueError, r"states\[1\]"),
    ({"model": "mlp"}, TypeError, "model"),
]


@pytest.mark.parametrize("over,exc,name", BAD_STEP_INPUTS)
def test_lm_step_rejects(prob, over, exc, name):
    with pytest.raises(exc, match=name):
        call_step(prob, **over)


def test_lm_step_rejects_bad_matmul_precision(prob):
    with pytest.raises(ValueError, match="matmul_precision"):
        call_step(prob, matmul_precision="fastest")


def test_state_damping_negative(prob):
    with pytest.raises(ValueError, match="state_damping"):
        call_step(prob, state_damping=-1.0)


def test_depth_zero_model():
    model = eqx.nn.MLP(3, 1, 4, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="depth"):
        alm_jax.forward_states(model, jnp.ones((2, 3)))


def test_parametrised_activation_rejected():
    class PReLU(eqx.Module):
        a: jax.Array

        def __call__(self, z):
            return jnp.where(z > 0, z, self.a * z)

    model = eqx.nn.MLP(3, 1, 4, 1, activation=PReLU(jnp.asarray(0.1)), key=jax.random.key(0))
    with pytest.raises(TypeError, match="activation"):
        alm_jax.forward_states(model, jnp.ones((2, 3)))


BAD_SOLVER_OPTIONS = [
    ({"policy": "nope"}, ValueError, "policy"),
    ({"policy": 3}, TypeError, "policy"),
    ({"max_inner_steps": 0}, ValueError, "max_inner_steps"),
    ({"max_inner_steps": 2.5}, TypeError, "max_inner_steps"),
    ({"max_steps": 0}, ValueError, "max_steps"),  # cg's own cap, None by default
    ({"max_steps": 1.5}, TypeError, "max_steps"),
    ({"state_damping_ratio": -1.0}, ValueError, "state_damping_ratio"),
    ({"init_damping": 0.0}, ValueError, "init_damping"),
    ({"feasibility_tol": -1.0}, ValueError, "feasibility_tol"),
    ({"stationarity_tol": float("inf")}, ValueError, "stationarity_tol"),
    ({"inner": "lm", "chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 64}, TypeError, "chunk_size"),  # the default inner solver "cg" has no chunks
    ({"matmul_precision": "fp32"}, ValueError, "matmul_precision"),
    ({"multipliers": "least_squares"}, ValueError, "multipliers"),
    ({"reshoot_above": 0.0}, ValueError, "reshoot_above"),
    ({"reshoot_above": "1e5"}, TypeError, "reshoot_above"),
]


@pytest.mark.parametrize("opts,exc,name", BAD_SOLVER_OPTIONS)
def test_solver_options_rejected(opts, exc, name):
    with pytest.raises(exc, match=name):
        alm_jax.alm(**opts)


def test_policy_options_rejected():
    with pytest.raises(ValueError, match="beta0"):
        alm_jax.policies.bertsekas(beta0=-1.0)
    with pytest.raises(ValueError, match="eps_opt"):
        alm_jax.policies.algencan(eps_opt=0.0)


def test_fit_budget_options_rejected(prob):
    with pytest.raises(ValueError, match="time_budget"):
        alm_jax.fit(prob.model, prob.x, prob.y, time_budget=-1.0, progress=False)
    with pytest.raises(TypeError, match="max_steps"):
        alm_jax.fit(prob.model, prob.x, prob.y, max_steps=1.5, progress=False)
    with pytest.raises(TypeError, match="fit"):
        alm_jax.fit(prob.model, prob.x, prob.y, solver=alm_jax.alm(), policy="lancelot", progress=False)
    with pytest.raises(ValueError, match="x and y"):
        alm_jax.fit(prob.model, prob.x, prob.y[:3], progress=False)


def test_errors_are_raised_before_compilation(prob, monkeypatch):
    """Validation happens in Python: the jitted step is never reached."""
    from alm_jax import _functional

    def boom(*a, **k):
        raise AssertionError("compiled step reached")

    monkeypatch.setattr(_functional, "structured_step", boom)
    with pytest.raises(ValueError, match="beta"):
        call_step(prob, beta=-2.0)


def test_uci_loader_errors():
    with pytest.raises(ValueError, match="name"):
        alm_jax.datasets.load_uci("boston")
    with pytest.raises(ValueError, match="split"):
        alm_jax.datasets.load_uci("yacht", 20)
