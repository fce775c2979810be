"""Losses beyond least squares: the generalised Gauss–Newton treatment.

The structured GGN step is checked against a dense `lstsq` whose loss factor
is computed independently: the symmetric square root of ∇²ℓ = diag(p) − ppᵀ
by `eigh`, with r = (∇²ℓ)^{+½} ∇ℓ. The step depends on the factor only through
LᵀL and Lᵀr, so both factors must give the same step; tolerance 1e-10 as in
`test_structured_step` (float64, problems of condition ≲ 1e6 after damping).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import alm_jax
from alm_jax.losses import softmax_cross_entropy
from _problems import make_problem

RTOL = 1e-10
XENT = "softmax_cross_entropy"


def _one_hot_targets(m, n_out, seed):
    labels = jax.random.randint(jax.random.key(seed), (m,), 0, n_out)
    return jax.nn.one_hot(labels, n_out, dtype=jnp.float64)


def _eigh_factor(o, y):
    """Symmetric square root of diag(p) − ppᵀ and r = H^{+½}(p − y), per sample."""
    p = jax.nn.softmax(o, axis=-1)
    hess = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    vals, vecs = jnp.linalg.eigh(hess)
    keep = vals > 1e-12 * vals[:, -1:]
    root = jnp.where(keep, jnp.sqrt(jnp.where(keep, vals, 1)), 0)
    pinv_root = jnp.where(keep, 1 / jnp.where(keep, root, 1), 0)
    L = jnp.einsum("mij,mj,mkj->mik", vecs, root, vecs)
    g = p - y
    r = jnp.einsum("mij,mj,mkj,mk->mi", vecs, pinv_root, vecs, g)
    return r, L


@eqx.filter_jit  # eagerly, the Jacobian's columns and the eigh compiled op by op, for seconds
def _dense_ggn_step(prob, y, beta, mu_w, mu_z):
    """lstsq on [constraint rows; L·∂o/√β] with the eigh factor (independent of the library's)."""
    params, static = eqx.partition(prob.model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree((params, prob.states))
    n_theta = ravel_pytree(params)[0].size
    m, ny = y.shape

    def rows(v):
        # With the squared loss and y = 0 the output rows are o/√β.
        p, s = unravel(v)
        return alm_jax.residual(eqx.combine(p, static), s, prob.multipliers, prob.x, jnp.zeros_like(y), beta)

    full = rows(flat)
    jac = jax.jacfwd(rows)(flat)
    n_o = m * ny
    logits = full[:n_o].reshape(m, ny) * jnp.sqrt(beta)
    r, L = _eigh_factor(logits, y)
    j_o = jnp.einsum("mab,mbp->map", L, jac[:n_o].reshape(m, ny, -1)).reshape(n_o, -1)
    a = jnp.concatenate([j_o, jac[n_o:], jnp.diag(jnp.sqrt(jnp.concatenate(
        [jnp.full(n_theta, mu_w), jnp.full(flat.size - n_theta, mu_z)])))])
    b = jnp.concatenate([-r.reshape(-1) / jnp.sqrt(beta), -full[n_o:], jnp.zeros_like(flat)])
    return jnp.linalg.lstsq(a, b)[0]


SLOW = pytest.mark.slow  # kept out of the default run to hold it under ~10 minutes
CASES = [
    # depth, width, n_in, n_out, m, bias, mu_w, mu_z, chunk
    (1, 4, 3, 2, 7, True, 1e-2, 1e-2, None),  # the one-hidden-layer closed form's GGN step
    pytest.param((1, 5, 2, 4, 9, True, 1e-3, 1e-8, None), marks=SLOW),
    pytest.param((2, 4, 3, 3, 6, False, 1e-2, 1e-3, None), marks=SLOW),
    pytest.param((2, 3, 4, 5, 8, True, 1e-1, 0.0, 3), marks=SLOW),  # chunked sweeps: the depth-4 row
    pytest.param((3, 4, 2, 3, 7, True, 1e-2, 1e-4, None), marks=SLOW),
    (4, 3, 3, 2, 6, True, 1e-3, 1e-2, 2),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_ggn_step_matches_dense_lstsq(case):
    depth, width, n_in, n_out, m, bias, mu_w, mu_z, chunk = case
    prob = make_problem(depth=depth, width=width, n_in=n_in, n_out=n_out, m=m, bias=bias, seed=depth + n_out)
    y = _one_hot_targets(m, n_out, depth)
    beta = 3.0
    ref = _dense_ggn_step(prob, y, beta, mu_w, mu_z)
    d = alm_jax.lm_step(prob.model, prob.states, prob.multipliers, prob.x, y, beta, mu_w,
                        state_damping=mu_z, chunk_size=chunk, loss=XENT)
    got = ravel_pytree(d)[0]
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert err <= RTOL, err
    dense = ravel_pytree(alm_jax.dense_lm_step(prob.model, prob.states, prob.multipliers, prob.x, y, beta, mu_w,
                                               state_damping=mu_z, loss=XENT))[0]
    assert float(jnp.linalg.norm(dense - ref) / jnp.linalg.norm(ref)) <= RTOL


def test_cross_entropy_factor_identities():
    """LᵀL = diag(p) − ppᵀ and Lᵀr = p − y = ∇ℓ, also for logits of size 50 (p down to e^-100)."""
    key = jax.random.key(0)
    o = 50 * jax.random.normal(key, (20, 6), jnp.float64)
    y = _one_hot_targets(20, 6, 1)
    loss = softmax_cross_entropy()
    r, L = loss.factor(o, y)
    p = jax.nn.softmax(o)
    hess = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    np.testing.assert_allclose(jnp.einsum("mab,mac->mbc", L, L), hess, atol=1e-15)
    grad = jax.grad(lambda u: jnp.sum(loss.value(u, y)))(o)
    np.testing.assert_allclose(jnp.einsum("mab,ma->mb", L, r), grad, atol=1e-12)
    np.testing.assert_allclose(grad, p - y, atol=1e-15)


def test_gradient_is_beta_jt_residual():
    """∇L_β = β Jᵀ F_β with the GGN residual (it is the merit's gradient)."""
    prob = make_problem(depth=2, width=4, n_out=3, m=6, seed=5)
    y = _one_hot_targets(6, 3, 2)
    beta = 2.5
    params, static = eqx.partition(prob.model, eqx.is_inexact_array)

    def res(p, s):
        return alm_jax.residual(eqx.combine(p, static), s, prob.multipliers, prob.x, y, beta, loss=XENT)

    r, vjp = jax.vjp(res, params, prob.states)
    jtr = ravel_pytree(vjp(r))[0]
    gm, gs = alm_jax.augmented_lagrangian_grad(prob.model, prob.states, prob.multipliers, prob.x, y, beta, loss=XENT)
    np.testing.assert_allclose(beta * jtr, ravel_pytree((gm, gs))[0], rtol=1e-12, atol=1e-12)


def _blobs(m_per, n_classes, dim, seed):
    key = jax.random.split(jax.random.key(seed), 2)
    centres = 3 * jax.random.normal(key[0], (n_classes, dim), jnp.float64)
    labels = jnp.repeat(jnp.arange(n_classes), m_per)
    x = centres[labels] + jax.random.normal(key[1], (labels.size, dim), jnp.float64)
    return x, jax.nn.one_hot(labels, n_classes, dtype=jnp.float64), labels


@pytest.mark.parametrize("inner", ["cg", pytest.param("lm", marks=SLOW)])
def test_fit_classifies_separable_blobs(inner):
    """Three well-separated Gaussian blobs: the mean cross-entropy falls below 0.05 and
    every training point is classified correctly within 60 updates."""
    x, y, labels = _blobs(20, 3, 2, 0)
    model = eqx.nn.MLP(2, 3, 8, 2, activation=jnp.tanh, dtype=jnp.float64, key=jax.random.key(1))
    model, hist, state = alm_jax.fit(model, x, y, loss=XENT, inner=inner, max_steps=60, progress=False)
    assert hist.loss[-1] < 0.05 < hist.loss[0]
    assert state.spec.loss.name == XENT
    pred = jnp.argmax(jax.vmap(model)(x), axis=-1)
    assert bool(jnp.all(pred == labels))


def test_bad_targets_raise():
    model = eqx.nn.MLP(2, 3, 4, 1, dtype=jnp.float64, key=jax.random.key(0))
    x = jnp.zeros((4, 2))
    solver = alm_jax.alm(loss=XENT)
    with pytest.raises(ValueError, match="one-hot"):
        solver.init(model, x, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        alm_jax.alm(loss=XENT).init(eqx.nn.MLP(2, 1, 4, 1, dtype=jnp.float64, key=jax.random.key(0)),
                                    x, jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="unknown loss"):
        alm_jax.alm(loss="hinge")
