"""Heavier checks, left out of the default run (`python -m pytest -m slow`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jax.flatten_util import ravel_pytree

import alm_jax
from _problems import make_problem
from test_structured_step import RTOL, dense_reference


@pytest.mark.slow
@pytest.mark.parametrize("depth,width,m", [(5, 6, 20), (6, 4, 30), (3, 10, 25)])
def test_deeper_and_wider_steps_match_dense(depth, width, m):
    prob = make_problem(depth=depth, width=width, n_in=4, n_out=2, m=m, seed=depth)
    ref, _ = dense_reference(prob, 7.0, 1e-3, 1e-7)
    got = ravel_pytree(alm_jax.lm_step(*prob[:3], prob.x, prob.y, 7.0, 1e-3, state_damping=1e-7,
                                       chunk_size=m // 3))[0]
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) <= RTOL


@pytest.mark.slow
def test_concrete_two_hidden_layers():
    """300 LM iterations on concrete (927 samples) with an 8-32-32-1 tanh MLP
    bring the training MSE from ≈ 1 to below 0.05 (standardised units)."""
    data = alm_jax.datasets.load_uci("concrete", 0)
    model = eqx.nn.MLP(8, 1, 32, 2, activation=jnp.tanh, key=jax.random.key(0))
    res = alm_jax.fit(model, data.x_train, data.y_train, max_steps=300, progress=False)
    assert res.history.mse[0] > 0.5
    assert res.history.mse[-1] < 0.05


@pytest.mark.slow
def test_digits_classification_accuracy():
    """400 ALM updates (cg, GGN cross-entropy) on digits split 0 with a 64-32-10 tanh MLP:
    training accuracy 100 % and test accuracy ≥ 96 % (we measured 98.6 % after 30 s;
    Adam's best in benchmarks/RESULTS.md is about 98 %)."""
    data = alm_jax.datasets.load_digits(0)
    model = eqx.nn.MLP(64, 10, 32, 1, activation=jnp.tanh, key=jax.random.key(0))
    res = alm_jax.fit(model, data.x_train, data.y_train, loss="softmax_cross_entropy", max_steps=400,
                      progress=False)
    acc = lambda x, labels: data.accuracy(jax.vmap(res.model)(jnp.asarray(x)), labels)
    assert acc(data.x_train, data.labels_train) == 1.0
    assert acc(data.x_test, data.labels_test) >= 0.96
