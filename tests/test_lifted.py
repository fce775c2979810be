"""Residual, constraints, L_β and its gradient against hand-written NumPy formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alm_jax
from alm_jax._chain import mlp_to_chain
from alm_jax._lifted import adjoint_multipliers, augmented_lagrangian_stacked, constraints_stacked, forward_states_stacked
from alm_jax._losses import get_loss
from _problems import lagrangian_state_gradient, make_problem


def numpy_layers(model):
    """(W, b) per layer from an eqx.nn.MLP built without scan."""
    return [(np.asarray(l.weight), None if l.bias is None else np.asarray(l.bias)) for l in model.layers]


def np_forward(layers, x, act):
    z, states = x, []
    for w, b in layers[:-1]:
        z = act(z @ w.T + (0 if b is None else b))
        states.append(z)
    return states


@pytest.mark.parametrize("depth,bias,n_out", [(1, True, 1), (2, False, 2), (3, True, 3)])
def test_formulas(depth, bias, n_out):
    prob = make_problem(depth=depth, width=4, n_out=n_out, m=5, bias=bias, seed=depth)
    beta = 2.5
    layers = numpy_layers(prob.model)
    x, y = np.asarray(prob.x), np.asarray(prob.y)
    Z = [np.asarray(s) for s in prob.states]
    L = [np.asarray(s) for s in prob.multipliers]

    fwd = alm_jax.forward_states(prob.model, prob.x)
    for a, b in zip(fwd, np_forward(layers, x, np.tanh)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)

    inputs = [x] + Z[:-1]
    h = [Z[a] - np.tanh(inputs[a] @ layers[a][0].T + (0 if layers[a][1] is None else layers[a][1]))
         for a in range(depth)]
    wN, bN = layers[-1]
    F = Z[-1] @ wN.T + (0 if bN is None else bN) - y
    for a, b in zip(alm_jax.constraints(prob.model, prob.states, prob.x), h):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)

    r = alm_jax.residual(prob.model, prob.states, prob.multipliers, prob.x, prob.y, beta)
    expect = np.concatenate([(F / np.sqrt(beta)).ravel()] + [(ha + la / beta).ravel() for ha, la in zip(h, L)])
    np.testing.assert_allclose(r, expect, rtol=1e-13, atol=1e-14)

    lval = alm_jax.augmented_lagrangian(prob.model, prob.states, prob.multipliers, prob.x, prob.y, beta)
    expect_l = 0.5 * np.sum(F**2) + sum(np.sum(la * ha) for la, ha in zip(L, h)) + beta / 2 * sum(
        np.sum(ha**2) for ha in h)
    np.testing.assert_allclose(lval, expect_l, rtol=1e-13)
    # L_β = (β/2)‖F_β‖² − ‖λ‖²/(2β)
    np.testing.assert_allclose(lval, beta / 2 * np.sum(expect**2) - sum(np.sum(la**2) for la in L) / (2 * beta),
                               rtol=1e-12)

    # Hand-written gradient: with δ_a = λ_a + β h_a and t_a = tanh(s_a),
    # ∂L/∂z_{a+1} = δ_a − [a+1 < N] W_{a+1}ᵀ((1 − t_{a+1}²) δ_{a+1}) + [a+1 = N] W_Nᵀ F,
    # ∂L/∂W_a = −((1 − t_a²) δ_a)ᵀ z_a,  ∂L/∂W_N = Fᵀ z_N.
    s = [inputs[a] @ layers[a][0].T + (0 if layers[a][1] is None else layers[a][1]) for a in range(depth)]
    d = [L[a] + beta * h[a] for a in range(depth)]
    g = [(1 - np.tanh(s[a]) ** 2) * d[a] for a in range(depth)]
    gz = []
    for a in range(depth):
        v = d[a].copy()
        v += (-g[a + 1] @ layers[a + 1][0]) if a + 1 < depth else F @ wN
        gz.append(v)
    gw = [-(g[a].T @ inputs[a]) for a in range(depth)] + [F.T @ Z[-1]]
    gb = [-(g[a].sum(0)) for a in range(depth)] + [F.sum(0)]
    dmodel, dstates = alm_jax.augmented_lagrangian_grad(prob.model, prob.states, prob.multipliers, prob.x,
                                                        prob.y, beta)
    for a, b in zip(dstates, gz):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    for lay, w, b in zip(dmodel.layers, gw, gb):
        np.testing.assert_allclose(lay.weight, w, rtol=1e-12, atol=1e-13)
        if bias:
            np.testing.assert_allclose(lay.bias, b, rtol=1e-12, atol=1e-13)


def test_forward_states_make_constraints_vanish():
    prob = make_problem(depth=3, width=5, m=4, scan=True)
    states = alm_jax.forward_states(prob.model, prob.x)
    # zero up to round-off: the forward pass and h order their sums differently
    for h in alm_jax.constraints(prob.model, states, prob.x):
        assert float(jnp.max(jnp.abs(h))) <= 1e-14
    # and the lifted output equals the model's own forward pass
    pred = jax.vmap(prob.model)(prob.x)
    zeros = tuple(jnp.zeros_like(s) for s in states)
    r = alm_jax.residual(prob.model, states, zeros, prob.x, prob.y, 1.0)
    np.testing.assert_allclose(r[: prob.y.size], (pred - prob.y).ravel(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("depth", [1, 3])
def test_rollout_states_meet_the_given_defects(depth):
    """forward_states_stacked(..., defects=c) gives states whose constraints are c
    (to round-off: float64, h recomputes each φ(W z) with its own summation order)."""
    prob = make_problem(depth=depth, width=4, n_out=2, m=5, seed=depth)
    params, spec = mlp_to_chain(prob.model)
    c = 0.1 * jax.random.normal(jax.random.key(7), (depth, 5, 4), jnp.float64)
    Z = forward_states_stacked(params, spec, prob.x, defects=c)
    np.testing.assert_allclose(constraints_stacked(params, spec, prob.x, Z), c, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(forward_states_stacked(params, spec, prob.x, defects=jnp.zeros_like(c)),
                                  forward_states_stacked(params, spec, prob.x))


@pytest.mark.parametrize("depth,bias,n_out,loss", [(1, True, 1, "squared"), (3, False, 2, "squared"),
                                                   (5, True, 3, "softmax_cross_entropy")])
def test_adjoint_multipliers_make_the_lagrangian_stationary_in_the_states(depth, bias, n_out, loss):
    """At states off the forward pass (h ≠ 0), ∇_Z(Σℓ + ⟨λ, h⟩) = 0 for λ = adjoint_multipliers.
    The gradient's entries are O(1) and each is a few width-4 sums, so float64 round-off is
    ≈ 1e-16; 1e-13 allows for the depth."""
    prob = make_problem(depth=depth, width=4, n_out=n_out, m=5, bias=bias, seed=depth)
    params, spec = mlp_to_chain(prob.model)
    spec = dataclasses.replace(spec, loss=get_loss(loss))
    y = jax.nn.one_hot(jnp.arange(5) % n_out, n_out, dtype=jnp.float64) if loss != "squared" else prob.y
    Z = jnp.stack(prob.states)
    h = constraints_stacked(params, spec, prob.x, Z)
    assert float(jnp.max(jnp.abs(h))) > 0.1
    lam = adjoint_multipliers(params, spec, prob.x, y, h)
    assert float(jnp.max(jnp.abs(lam))) > 0.05  # not trivially zero
    g = lagrangian_state_gradient(params, spec, prob.x, y, Z, lam)
    np.testing.assert_allclose(g, 0, atol=1e-13)


def test_adjoint_multipliers_equal_the_first_order_update_where_the_subproblem_is_solved_in_the_states():
    """With θ fixed and Z a stationary point of L_σ(θ, ·, λ) (Newton's method to ‖∇‖∞ < 1e-14
    on a depth-2 net), λ + σh solves the same adjoint equations, so the two multiplier updates
    coincide; elsewhere they differ by (∂h/∂Z)⁻ᵀ∇_Z L_σ."""
    prob = make_problem(depth=2, width=3, n_out=2, m=4, seed=11)
    params, spec = mlp_to_chain(prob.model)
    x, y, lam, sigma = prob.x, prob.y, jnp.stack(prob.multipliers), 2.5
    Z = jnp.stack(prob.states)

    def f(v):
        return augmented_lagrangian_stacked(params, v.reshape(Z.shape), spec, x, y, lam, sigma)

    grad, hess = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
    v = Z.ravel()
    for _ in range(30):
        v = v - jnp.linalg.solve(hess(v), grad(v))
    assert float(jnp.max(jnp.abs(grad(v)))) < 1e-14
    Zs = v.reshape(Z.shape)
    hs, h = constraints_stacked(params, spec, x, Zs), constraints_stacked(params, spec, x, Z)
    np.testing.assert_allclose(adjoint_multipliers(params, spec, x, y, hs), lam + sigma * hs, rtol=0, atol=1e-13)
    # away from it they differ, by (∂h/∂Z)⁻ᵀ∇_Z L_σ from a dense Jacobian
    gap = lam + sigma * h - adjoint_multipliers(params, spec, x, y, h)
    jac = jax.jacfwd(lambda u: constraints_stacked(params, spec, x, u.reshape(Z.shape)).ravel())(Z.ravel())
    expect = jnp.linalg.solve(jac.T, grad(Z.ravel()))
    assert float(jnp.max(jnp.abs(gap))) > 0.1
    np.testing.assert_allclose(gap.ravel(), expect, rtol=0, atol=1e-13)
