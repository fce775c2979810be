"""The README's main job runs end to end; the baselines respect their budgets.

optax's Adam mixes its int32 step count with floats, which strict dtype
promotion (set in conftest for our own code) rejects, so these tests run
third-party optimisers under standard promotion.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alm_jax
from alm_jax import __main__ as main_job
from alm_jax._baselines import train_adam, train_lbfgs, train_optx_lm


@pytest.fixture(autouse=True)
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_main_job_prints_results(capsys):
    assert main_job.main(["--time-budget", "6", "--width", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "results on yacht" in out
    assert "ALM + cg" in out and "Adam" in out


def test_main_job_rejects_unknown_dataset():
    with pytest.raises(SystemExit):
        main_job.main(["--dataset", "boston"])


@pytest.mark.parametrize("trainer", [train_adam, train_lbfgs, train_optx_lm])
def test_baselines_reduce_mse_within_budget(trainer):
    if trainer is train_optx_lm:
        pytest.importorskip("optimistix")
    data = alm_jax.datasets.load_uci("yacht", 0)
    model = eqx.nn.MLP(6, 1, 8, 1, activation=jnp.tanh, key=jax.random.key(0))
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    budget = 6.0
    run = trainer(model, x, y, time_budget=budget)
    mse0 = float(jnp.mean((jax.vmap(model)(x) - y) ** 2))
    assert run.mses and run.mses[-1] < 0.5 * mse0
    assert run.seconds <= budget + max(0.5, 2 * float(np.median(np.diff(run.times))) if len(run.times) > 1 else 0.5)
