"""The inner `cg`'s `curvature_samples`: CG's products from every k-th sample.

The reference is dense, from the flattened lifted residual only: A = JᵀJ
(+ τ times the stage rows' Σ r_i ∇²r_i, the Hessian of ⟨r_h(x₀), r_h(x)⟩)
of the whole problem and A_B of the subsample's, and then

    S_B = (m/b)(A_θθ − A_θZ (A_ZZ + μ_z)⁻¹ A_Zθ)_B + μ_θ I,
    dθ = −S_B⁻¹ (g_θ − A_θZ (A_ZZ + μ_z)⁻¹ g_Z),   dZ = −(A_ZZ + μ_z)⁻¹ (g_Z + A_Zθ dθ),

g = ∇f of the whole problem. In float64 with μ_θ ≥ 1e-2 these systems have
condition numbers ≲ 1e5, so CG to rtol 1e-13 is accurate to ~1e-11; 1e-9
leaves margin, while a wrong scale m/b, a wrong sample or a subsampled
gradient gives errors of 1e-2 to O(1) (the test checks that the full-sample
step differs from the subsampled one by far more).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import alm_jax
from alm_jax._inner._lm import (AUTO_SAMPLES_PER_WEIGHT, LMOptions, _counted_step, _model_length, _step_model,
                                curvature_stride, lm_iteration)
from alm_jax._lifted import lifted_residual, merit
from alm_jax._linalg._linearise import every_kth
from alm_jax._linalg._matfree import matfree_step
from alm_jax._linalg._schur import num_weights

from _problems import make_problem, subproblem

CASES = {
    # depth, width, n_out, loss, second-order weight τ (one hidden layer only), μ_θ
    "depth1": (1, 5, 2, "squared", None, 1e-2),
    "depth1_second_order": (1, 4, 2, "squared", 0.5, 10.0),
    "depth3": (3, 4, 1, "squared", None, 1e-2),
    "xent_depth2": (2, 4, 3, "softmax_cross_entropy", None, 1e-2),
}
MU_Z = 1e-4


def _dense_system(params, spec, x, y, Z, Lam, sigma, tau):
    """(A, g, number of weights) over the flattened (θ, Z)."""
    flat, unravel = ravel_pytree((params, Z))

    def res(v):
        return lifted_residual(*unravel(v), spec, x, y, Lam, sigma)

    jac = jax.jacfwd(res)(flat)
    a = jac.T @ jac
    if tau is not None:
        r_h0 = res(flat)[-Z.size:]
        a = a + tau * jax.hessian(lambda v: jnp.dot(r_h0, res(v)[-Z.size:]))(flat)
    g = jax.grad(lambda v: merit(*unravel(v), spec, x, y, Lam, sigma))(flat)
    return a, g, ravel_pytree(params)[0].size


def _reference(params, spec, x, y, Z, Lam, sigma, tau, mu_w, k, offset):
    a, g, p = _dense_system(params, spec, x, y, Z, Lam, sigma, tau)
    m = x.shape[0]
    b = m // k
    take = lambda v, axis: every_kth(v, axis, k, offset)  # noqa: E731
    a_b, _, _ = _dense_system(params, spec, take(x, 0), take(y, 0), take(Z, 1), take(Lam, 1), sigma, tau)
    damp_z = MU_Z * jnp.eye(a.shape[0] - p)
    inv = jnp.linalg.inv(a[p:, p:] + damp_z)
    inv_b = jnp.linalg.inv(a_b[p:, p:] + MU_Z * jnp.eye(a_b.shape[0] - p))
    s_b = (m / b) * (a_b[:p, :p] - a_b[:p, p:] @ inv_b @ a_b[p:, :p]) + mu_w * jnp.eye(p)
    dtheta = -jnp.linalg.solve(s_b, g[:p] - a[:p, p:] @ inv @ g[p:])
    dz = -inv @ (g[p:] + a[p:, :p] @ dtheta)
    return jnp.concatenate([dtheta, dz])


# Each stride compiles a step (≈ 5–15 s a row on the CI machine): every
# (k, offset) on depth 1, one on the other shapes, the rest marked slow.
_FAST = {("depth1", 2, 0), ("depth1", 2, 1), ("depth1", 3, 2), ("depth1_second_order", 3, 2), ("depth3", 3, 2),
         ("xent_depth2", 3, 2)}


@pytest.mark.parametrize("case,k,offset", [
    pytest.param(c, k, o, marks=() if (c, k, o) in _FAST else pytest.mark.slow)
    for c in sorted(CASES) for k, o in [(2, 0), (2, 1), (3, 2)]])
def test_subsampled_step_matches_the_dense_reference(case, k, offset):
    depth, width, n_out, loss, tau, mu_w = CASES[case]
    params, spec, Z, p = subproblem(depth, width, n_out, m=13, seed=2, loss=loss, perturb=0.5)
    args = (params, spec, p.x, p.y, Z, p.multipliers, p.sigma, mu_w, MU_Z, 1e-13)
    ref = _reference(params, spec, p.x, p.y, Z, p.multipliers, p.sigma, tau, mu_w, k, offset)
    dp, dz, _ = matfree_step(*args, max_steps=1000, precondition=True, curvature_weight=tau, stride=k,
                             offset=jnp.asarray(offset, jnp.int32))
    got = ravel_pytree((dp, dz))[0]
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert err < 1e-9, err
    full = _reference(params, spec, p.x, p.y, Z, p.multipliers, p.sigma, tau, mu_w, 1, 0)
    assert float(jnp.linalg.norm(full - ref) / jnp.linalg.norm(ref)) > 1e-3  # the test can tell


def test_float32_products_on_a_subsample():
    """With `solve_dtype="float32"` the subsample's products run in float32 and
    the step comes back in float64, within the float32 floor of the float64 one
    (≈ κ·ε₃₂; bound 1e-3 as in `test_inner`)."""
    params, spec, Z, p = subproblem(1, 5, 2, m=13, seed=2, perturb=0.5)
    args = (params, spec, p.x, p.y, Z, p.multipliers, p.sigma, 1e-2, MU_Z, 1e-6)
    ref = ravel_pytree(matfree_step(*args, max_steps=500, precondition=True, stride=3, offset=1)[:2])[0]
    with jax.default_matmul_precision("highest"):
        dp, dz, _ = matfree_step(*args, max_steps=500, precondition=True, stride=3, offset=1,
                                 solve_dtype="float32")
    assert all(v.dtype == jnp.float64 for v in jax.tree_util.tree_leaves((dp, dz)))
    err = float(jnp.linalg.norm(ravel_pytree((dp, dz))[0] - ref) / jnp.linalg.norm(ref))
    assert 1e-8 < err < 1e-3


def test_stride_from_the_option():
    """k = ⌊m/b⌋, b = 4 samples per weight for "auto", at least 1; None is every sample."""
    _, spec, _, _ = subproblem(1, 5, 2, m=13)
    p = num_weights(spec)
    assert AUTO_SAMPLES_PER_WEIGHT == 4
    assert curvature_stride("auto", spec, 8 * p - 1) == 1
    assert curvature_stride("auto", spec, 8 * p) == 2
    assert curvature_stride("auto", spec, 30 * p) == 7
    assert curvature_stride(None, spec, 100 * p) == 1
    assert curvature_stride(5, spec, 13) == 2
    assert curvature_stride(20, spec, 13) == 1


def test_the_offset_cycles_through_the_samples():
    """With k = 3 the inner state's offset runs 0, 1, 2, 0, … over LM steps;
    where "auto" takes every sample, the state has no offset at all (the
    default program is unchanged there)."""
    pb = make_problem(depth=1, width=3, n_in=2, n_out=1, m=12, seed=3)
    solver = alm_jax.alm(curvature_samples=4)
    state = solver.init(pb.model, pb.x, pb.y)
    update = jax.jit(solver.update)
    offsets = []
    for _ in range(5):
        offsets.append(int(state.inner.sample_offset))
        state, info = update(state, pb.x, pb.y)
        assert np.isfinite(float(info.objective))
    assert offsets == [0, 1, 2, 0, 1]
    assert alm_jax.alm().init(pb.model, pb.x, pb.y).inner.sample_offset is None


def test_training_with_a_subsample(cpu_auto):
    """Every step is judged on the whole problem's gain ratio. A 3-4-1 student
    of a 3-4-1 teacher, m = 600 (P = 21, so "auto" takes every 7th sample):
    40 updates bring the training loss from ≈ 0.04 after the first to
    1.4e-5 (every sample: 4e-6); bound 1e-4."""
    pb = make_problem(depth=1, width=4, n_in=3, n_out=1, m=600, seed=4, perturb=0.0)
    y = jax.vmap(make_problem(depth=1, width=4, n_in=3, n_out=1, m=2, seed=5).model)(pb.x)
    solver = alm_jax.alm()
    state = solver.init(pb.model, pb.x, y)
    assert state.inner.sample_offset is not None
    update = jax.jit(solver.update)
    losses = []
    for _ in range(40):
        state, info = update(state, pb.x, y)
        losses.append(float(info.loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 1e-4 < losses[0]


@pytest.mark.parametrize("value,err,match", [
    (0, ValueError, "curvature_samples"),
    ("all", ValueError, "curvature_samples"),
    (2.5, TypeError, "curvature_samples"),
])
def test_bad_curvature_samples(value, err, match):
    with pytest.raises(err, match=match):
        alm_jax.alm(curvature_samples=value)


def test_lm_uses_every_sample():
    """`lm` (also with `linear_solver="cg"`) has no subsample and no offset."""
    pb = make_problem(depth=1, width=3, n_in=2, n_out=1, m=12, seed=3)
    for kw in ({}, {"linear_solver": "cg"}):
        assert alm_jax.alm(inner="lm", **kw).init(pb.model, pb.x, pb.y).inner.sample_offset is None
    with pytest.raises(TypeError):
        alm_jax.alm(inner="lm", curvature_samples=4)


def _ray(params, spec, p, Z, dp, dz):
    """(a, c) of the model's decrease q(α) = αa − ½α²c along α(dθ, dZ), from forward mode of the dense residual."""
    r, jd = jax.jvp(lambda q, z: lifted_residual(q, z, spec, p.x, p.y, p.multipliers, p.sigma), (params, Z), (dp, dz))
    return -jnp.dot(r, jd), jnp.dot(jd, jd)


def test_subsampled_step_is_shortened_to_the_models_minimiser():
    """A step from a subsample's S_B can overshoot the whole problem's model;
    it is then taken at α* = a/c, the model's minimiser along it, and
    Nielsen's rule sees α*ρ. Here (m = 13, k = 3, μ = 0.1) the full step
    predicts an increase, q(1) < 0, so it would be rejected outright, and
    α* ≈ 0.15. a and c come from forward mode of the dense residual, so
    the check is independent of the step model's GEMMs (agreement 1e-10,
    relative, in float64); the step, the objective and μ follow to 1e-12."""
    params, spec, Z, p = subproblem(1, 5, 1, m=13, seed=0, perturb=0.5)
    mu = jnp.asarray(0.1)
    opts = LMOptions(linear_solver="cg", curvature_samples=4, cg_rtol=1e-12, cg_max_steps=500)
    assert curvature_stride(4, spec, 13) == 3
    args = (params, Z, spec, p.x, p.y, p.multipliers, p.sigma)
    dp, dz, _ = _counted_step(*args, mu, opts.state_damping_ratio * mu, opts, offset=1)
    a, c = _ray(params, spec, p, Z, dp, dz)
    alpha = a / c
    assert a - c / 2 < 0 and 0.05 < alpha < 0.5
    model = _step_model(*args, dp, dz, True)
    np.testing.assert_allclose(_model_length(model.slope, model.predicted), alpha, rtol=1e-10)

    res = lm_iteration(*args, mu, jnp.asarray(2.0), opts, offset=1)
    assert bool(res.accepted)
    moved = jax.tree_util.tree_map(lambda w, d: w + alpha * d, params, dp)
    for got, want in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(moved)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    f0 = merit(*args)
    np.testing.assert_allclose(res.objective, merit(res.params, res.states, *args[2:]), rtol=1e-12)
    rho = (f0 - res.objective) / (alpha * a - 0.5 * alpha**2 * c)
    want_mu = mu * max(1 / 3, 1 - (2 * alpha * rho - 1) ** 3)
    np.testing.assert_allclose(res.damping, want_mu, rtol=1e-10)


@pytest.mark.parametrize("rtol", [1e-12, 0.3])
def test_a_step_on_the_models_own_matrix_is_not_shortened(rtol):
    """With every sample, CG (exact or truncated, preconditioned) minimises
    the model over its Krylov space, so a ≥ c along its step (Galerkin:
    a = dᵀ(S + μ)d) and α* = 1: shortening changes only subsampled steps."""
    params, spec, Z, p = subproblem(1, 5, 1, m=13, seed=0, perturb=0.5)
    opts = LMOptions(linear_solver="cg", cg_rtol=rtol, cg_max_steps=500, precondition=True)
    args = (params, Z, spec, p.x, p.y, p.multipliers, p.sigma)
    for mu in (1e-3, 1e-1):
        dp, dz, steps = _counted_step(*args, jnp.asarray(mu), opts.state_damping_ratio * mu, opts)
        a, c = _ray(params, spec, p, Z, dp, dz)
        assert int(steps) >= 1 and a >= c * (1 - 1e-10)
        model = _step_model(*args, dp, dz, True)
        assert float(_model_length(model.slope, model.predicted)) == 1.0
