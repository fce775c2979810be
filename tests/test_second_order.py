"""The inner `cg`'s `second_order` option: Gauss–Newton plus the stage rows' curvature.

The reference Hessian is built from public-level pieces only: J by forward
mode of the flattened lifted residual, and the stage rows' Σ r_i ∇²r_i as
the Hessian of ⟨r_h(x₀), r_h(x)⟩ (r_h(x₀) held fixed). In float64 on these
problems (condition numbers ≲ 1e3 once damped) a backward-stable solve is
accurate to ~1e-13; 1e-10 leaves margin while a wrong sign, weight or block
gives errors of O(1).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import alm_jax
from alm_jax._inner import _lm
from alm_jax._inner._lm import LMOptions, _step_model, damped_step, lm_iteration
from alm_jax._lifted import lifted_residual, merit
from alm_jax._linalg import _curvature
from alm_jax._linalg._linearise import linearise
from alm_jax._linalg._matfree import matfree_step, pcg
from alm_jax._linalg._model import step_model

from _problems import subproblem


@pytest.fixture(scope="module")
def yacht():
    return alm_jax.datasets.load_uci("yacht", 0)


@pytest.fixture(scope="module")
def wine():
    return alm_jax.datasets.load_uci("wine-quality-red", 0)


CASES = {
    # width, n_out, loss, penalty, activation
    "tanh": (5, 2, "squared", "scalar", jnp.tanh),
    "softplus_one_output": (4, 1, "squared", "scalar", jax.nn.softplus),
    "sin_xent": (4, 3, "softmax_cross_entropy", "scalar", jnp.sin),
    "per_constraint": (6, 2, "squared", "per_constraint", jnp.tanh),
}


def _problem(width, n_out, loss, penalty, act, m=9):
    # Large multipliers: a large curvature term.
    params, spec, Z, p = subproblem(1, width, n_out, m=m, seed=1, loss=loss, act=act, perturb=0.5,
                                    multiplier_scale=3.0)
    sigma = p.sigma if penalty == "scalar" else jnp.linspace(0.5, 2.0, Z.size).reshape(Z.shape)
    return params, spec, p.x, p.y, Z, p.multipliers, sigma


def _dense(params, spec, x, y, Z, Lam, sigma):
    """∇f, JᵀJ and the stage rows' Σ r_i ∇²r_i over the flattened (θ, Z)."""
    flat, unravel = ravel_pytree((params, Z))

    def res(v):
        return lifted_residual(*unravel(v), spec, x, y, Lam, sigma)

    grad = jax.grad(lambda v: merit(*unravel(v), spec, x, y, Lam, sigma))(flat)
    jac = jax.jacfwd(res)(flat)
    r_h0 = res(flat)[-Z.size:]
    curv = jax.hessian(lambda v: jnp.dot(r_h0, res(v)[-Z.size:]))(flat)
    return grad, jac.T @ jac, curv, unravel, ravel_pytree(params)[0].size


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_step_solves_the_damped_newton_system(case, tau):
    """With τ·C added, CG to rtol 1e-13 solves (JᵀJ + τC + diag(μ)) d = −∇f.
    μ_θ = 10 makes the damped matrix positive definite here (asserted), so
    CG runs to convergence instead of stopping at negative curvature."""
    params, spec, x, y, Z, Lam, sigma = _problem(*CASES[case])
    grad, gn, curv, unravel, n_theta = _dense(params, spec, x, y, Z, Lam, sigma)
    mu_w, mu_z = 10.0, 1e-3
    damp = jnp.concatenate([jnp.full(n_theta, mu_w), jnp.full(grad.size - n_theta, mu_z)])
    a = gn + tau * curv + jnp.diag(damp)
    assert float(jnp.linalg.eigvalsh(a).min()) > 0
    assert float(jnp.linalg.eigvalsh(gn + curv).min()) < 0  # the term does make the undamped model indefinite
    ref = -jnp.linalg.solve(a, grad)
    dp, dz, _ = matfree_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, 1e-13, max_steps=500,
                             curvature_weight=tau)
    got = ravel_pytree((dp, dz))[0]
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 1e-10


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_curvature_matches_autodiff(case):
    """`step_model`'s ½dᵀC d equals the dense quadratic form (to 1e-12 relative)."""
    params, spec, x, y, Z, Lam, sigma = _problem(*CASES[case])
    _, _, curv, unravel, _ = _dense(params, spec, x, y, Z, Lam, sigma)
    key = jax.random.split(jax.random.key(5), 2)
    d = jax.random.normal(key[0], (curv.shape[0],), curv.dtype)
    dp, dz = unravel(d)
    lin = linearise(params, spec, x, y, Z, Lam, sigma)
    got = step_model(lin, spec, Lam, sigma, dp, dz, _curvature.curvature(lin, params, spec)).second_order
    np.testing.assert_allclose(got, 0.5 * d @ curv @ d, rtol=1e-12)


def test_cg_stops_at_nonpositive_curvature():
    """An indefinite system ends CG at the first direction with pᵀSp ≤ 0,
    keeping the iterate so far, instead of running to the step cap."""
    s = jnp.diag(jnp.array([2.0, 1.0, -5.0]))
    x, steps = pcg(lambda v: s @ v, jnp.ones(3), 1e-12, 50)
    assert int(steps) == 1 and float(jnp.max(jnp.abs(x))) == 0.0
    s = jnp.diag(jnp.array([4.0, 3.0, 1.0, -0.1]))  # the first direction has positive curvature
    x, steps = pcg(lambda v: s @ v, jnp.array([1.0, 1.0, 1.0, 1.0]), 1e-12, 50)
    assert 1 < int(steps) < 50 and bool(jnp.all(jnp.isfinite(x)))


def test_curvature_weight_follows_the_better_model():
    """After each step τ becomes the configured weight if the model with τC
    predicted the actual decrease better than Gauss–Newton, else 0 (Dennis,
    Gay & Welsch 1981), whichever model the step came from; across these
    dampings both outcomes occur."""
    params, spec, x, y, Z, Lam, sigma = _problem(*CASES["tanh"], m=12)
    weight = 0.5
    opts = LMOptions(linear_solver="cg", rollout=False, second_order=weight, cg_rtol=1e-10, cg_max_steps=200)
    outcomes = set()
    for damping in (1e-2, 1e-1, 1.0, 10.0):
        for tau in (0.0, weight):
            tau = jnp.asarray(tau)
            r = lm_iteration(params, Z, spec, x, y, Lam, sigma, jnp.asarray(damping), jnp.asarray(2.0), opts, tau)
            dp, dz = damped_step(params, Z, spec, x, y, Lam, sigma, damping, opts.state_damping_ratio * damping, opts,
                                 tau)
            model = _step_model(params, Z, spec, x, y, Lam, sigma, dp, dz, False, True)
            actual = model.objective - merit(jax.tree_util.tree_map(jnp.add, params, dp), Z + dz, spec, x, y, Lam,
                                             sigma)
            expect = weight if abs(actual - (model.predicted - weight * model.second_order)) < abs(
                actual - model.predicted) else 0.0
            assert float(r.curvature_weight) == expect
            outcomes.add(expect)
    assert outcomes == {0.0, weight}


def test_second_order_zero_leaves_gauss_newton_alone(yacht):
    """second_order=0 carries no curvature weight and gives the iterates of
    the Gauss–Newton program bit for bit (the same CG dtype, float64)."""
    model = eqx.nn.MLP(6, 1, 10, 1, activation=jnp.tanh, key=jax.random.key(0))
    x, y = jnp.asarray(yacht.x_train), jnp.asarray(yacht.y_train)
    a = alm_jax.fit(model, x, y, max_steps=8, progress=False, second_order=0.0, solve_dtype=None)
    b = alm_jax.fit(model, x, y, max_steps=8, progress=False, second_order=0, solve_dtype="float64")
    assert a.state.inner.curvature_weight is None
    np.testing.assert_array_equal(a.history.mse, b.history.mse)


# (depth, n_out, m, on) with width 4 and 3 inputs: one hidden layer (P = 21)
# with P ≤ m < 8P (on), with m ≥ 8P (subsampled, off) and with m < P (fewer
# residuals than weights, off); two hidden layers (off); two outputs (P = 26,
# residuals m·n_out) on and off.
AUTO_CASES = [(1, 1, 21, True), (1, 1, 8 * 21 - 1, True), (1, 1, 8 * 21, False), (1, 1, 20, False),
              (2, 1, 40, False), (1, 2, 13, True), (1, 2, 12, False)]


def _auto_problem(depth, n_out, m):
    """The "auto" tests' MLP (3 inputs, width 4) and m samples of a smooth target with n_out ≤ 2 outputs."""
    model = eqx.nn.MLP(3, n_out, 4, depth, activation=jnp.tanh, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (m, 3), jnp.float64)
    y = jnp.concatenate([jnp.sin(x[:, :1] - x[:, 1:2] * x[:, 2:]), jnp.cos(x[:, :1] + x[:, 2:])], axis=1)
    return model, x, y[:, :n_out]


@pytest.mark.parametrize("depth, n_out, m, on", AUTO_CASES)
def test_auto_second_order_and_solve_dtype(cpu_auto, depth, n_out, m, on):
    """The default ("auto") is τ = 0.5 with float32 CG where it is on and
    Gauss–Newton in the model's dtype where it is off: its iterates equal
    the explicit options' bit for bit (deterministic programs) and differ
    from those with the other CG dtype, and the curvature weight is
    carried exactly where τ > 0."""
    model, x, y = _auto_problem(depth, n_out, m)
    tau = 0.5 if on else 0.0
    auto = alm_jax.fit(model, x, y, max_steps=6, progress=False)
    ref = alm_jax.fit(model, x, y, max_steps=6, progress=False, second_order=tau,
                      solve_dtype="float32" if on else None)
    other = alm_jax.fit(model, x, y, max_steps=6, progress=False, second_order=tau,
                        solve_dtype=None if on else "float32")
    assert (auto.state.inner.curvature_weight is not None) == on
    np.testing.assert_array_equal(auto.history.mse, ref.history.mse)
    assert not np.array_equal(auto.history.mse, other.history.mse)


# (depth, m, on) on an accelerator, width 4, 3 inputs, one output (P = 21):
# m ≥ 8P, subsampled on a CPU, uses every sample there and is on.
AUTO_ACCELERATOR_CASES = [(1, 8 * 21, True), (1, 21, True), (1, 20, False), (2, 40, False)]


@pytest.mark.parametrize("depth, m, on", AUTO_ACCELERATOR_CASES)
def test_auto_on_an_accelerator(cpu_auto, monkeypatch, depth, m, on):
    """Where JAX's default device is an accelerator, "auto" is every sample
    in CG's products and the model's dtype, with τ = 0.5 where one hidden
    layer has P ≤ m·n_out: its iterates equal those explicit options' bit
    for bit and differ from the CPU's choice."""
    model, x, y = _auto_problem(depth, 1, m)
    cpu = alm_jax.fit(model, x, y, max_steps=6, progress=False)
    monkeypatch.setattr(_lm, "on_accelerator", lambda: True)
    auto = alm_jax.fit(model, x, y, max_steps=6, progress=False)
    ref = alm_jax.fit(model, x, y, max_steps=6, progress=False, second_order=0.5 if on else 0.0,
                      solve_dtype=None, curvature_samples=None)
    assert (auto.state.inner.curvature_weight is not None) == on
    assert auto.state.inner.sample_offset is None
    np.testing.assert_array_equal(auto.history.mse, ref.history.mse)
    differs = not np.array_equal(auto.history.mse, cpu.history.mse)
    assert differs == (depth == 1 and m >= 21)  # the CPU subsamples or runs CG in float32 there


def test_on_accelerator_follows_the_default_device(monkeypatch):
    """The default backend decides unless `jax.default_device` names another device."""
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert not _lm.on_accelerator()
    with jax.default_device("tpu"):
        assert _lm.on_accelerator()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _lm.on_accelerator()
    with jax.default_device(jax.devices("cpu")[0]):
        assert not _lm.on_accelerator()


def test_second_order_trains_wine(wine):
    """On UCI wine (large residuals) the term trains lower than Gauss–Newton:
    0.69× after 300 updates when measured (split 0). Single trajectories
    move by ±20 % with rounding (benchmarks/RESULTS.md, Rounds 12 and 14),
    so ≤ 0.85× is asserted."""
    model = eqx.nn.MLP(11, 1, 50, 1, activation=jnp.tanh, key=jax.random.key(0))
    x, y = jnp.asarray(wine.x_train), jnp.asarray(wine.y_train)
    gn = alm_jax.fit(model, x, y, max_steps=300, progress=False, second_order=0.0, solve_dtype=None)
    so = alm_jax.fit(model, x, y, max_steps=300, progress=False, second_order=0.5, solve_dtype=None)
    assert np.all(np.isfinite(so.history.mse))
    assert so.history.mse[-1] < 0.85 * gn.history.mse[-1]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"second_order": -0.5}, ValueError, "second_order"),
    ({"second_order": 1.5}, ValueError, "second_order"),
    ({"second_order": "yes"}, ValueError, "second_order"),
    ({"second_order": [0.5]}, TypeError, "second_order"),
    ({"solve_dtype": "bfloat16"}, ValueError, "solve_dtype"),
    ({"solve_dtype": "Auto"}, ValueError, "solve_dtype"),
])
def test_bad_second_order_raises(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        alm_jax.alm(**kwargs)


@pytest.mark.parametrize("build", ["deep_mlp", "layer_chain"])
def test_second_order_needs_one_hidden_layer(build):
    x, y = jnp.ones((4, 3)), jnp.ones((4, 1))
    if build == "deep_mlp":
        model = eqx.nn.MLP(3, 1, 4, 2, activation=jnp.tanh, key=jax.random.key(0))
        match = "depth 2"
    else:
        keys = jax.random.split(jax.random.key(0), 2)
        model = [eqx.nn.Linear(3, 4, key=keys[0]), eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(4, 1, key=keys[1])]
        match = "layer chain"
    with pytest.raises(ValueError, match=match):
        alm_jax.alm(second_order=0.5).init(model, x, y)
