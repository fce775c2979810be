"""Each penalty policy follows its published rule on scripted ‖h‖ sequences."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from alm_jax import policies
from alm_jax._alm import safeguard_penalty, stall_penalty


def h_with_norm(v, shape=(2, 3, 4)):
    """A constraint array with ‖h‖₂ = ‖h‖∞·... : a single nonzero entry of size v."""
    h = np.zeros(shape)
    h.flat[0] = v
    return jnp.asarray(h)


def run(policy, f, norms):
    s = policy.init(jnp.asarray(f), jnp.zeros((2, 3, 4)))
    out = [s]
    flags = []
    for v in norms:
        s, upd = policy.update(s, jnp.asarray(f), h_with_norm(v))
        out.append(s)
        flags.append(bool(upd))
    return out, flags


def test_bertsekas_grows_when_infeasibility_stalls():
    pol = policies.bertsekas(beta0=10.0, gamma=10.0, tau=0.25, eps0=1.0, eps_factor=0.1, eps_min=1e-3)
    states, flags = run(pol, 5.0, [1.0, 0.2, 0.1, 0.01, 0.005])
    betas = [float(s.sigma) for s in states]
    # 1.0: first (no previous) → keep; 0.2 ≤ 0.25·1 → keep; 0.1 > 0.25·0.2 → ×10;
    # 0.01 ≤ 0.25·0.1 → keep; 0.005 > 0.25·0.01 → ×10
    assert betas == [10.0, 10.0, 10.0, 100.0, 100.0, 1000.0]
    assert [float(s.eps) for s in states] == pytest.approx([1.0, 0.1, 0.01, 1e-3, 1e-3, 1e-3])
    assert all(flags)


def test_lancelot_success_and_failure_branches():
    pol = policies.lancelot(beta0=10.0)
    s0 = pol.init(jnp.asarray(1.0), jnp.zeros((2, 3, 4)))
    assert float(s0.sigma) == 10.0
    assert float(s0.eps) == pytest.approx(0.1)
    assert float(s0.eta) == pytest.approx(10**-0.1)
    # success: ‖h‖ ≤ η → keep β, η ← η/β^0.9, ω ← ω/β, update λ
    s1, upd = pol.update(s0, jnp.asarray(1.0), h_with_norm(0.5))
    assert bool(upd) and float(s1.sigma) == 10.0
    assert float(s1.eta) == pytest.approx(10**-0.1 / 10**0.9)
    assert float(s1.eps) == pytest.approx(0.01)
    # failure: ‖h‖ > η → β ← 100β, η ← 1/β^0.1, ω ← 1/β, keep λ
    s2, upd = pol.update(s1, jnp.asarray(1.0), h_with_norm(0.5))
    assert not bool(upd) and float(s2.sigma) == 1000.0
    assert float(s2.eta) == pytest.approx(1000**-0.1)
    assert float(s2.eps) == pytest.approx(1e-3)


def test_algencan_initial_penalty_and_infinity_norm_rule():
    pol = policies.algencan(eps_opt=1e-8)
    s0 = pol.init(jnp.asarray(37.0), jnp.zeros((2, 3, 4)))
    assert float(s0.sigma) == pytest.approx(10 * 37.0)  # 10·max(1,|f|)/max(1, ½‖h‖²)
    assert float(s0.eps) == pytest.approx(1e-4)  # √ε_opt
    s1, _ = pol.update(s0, jnp.asarray(37.0), h_with_norm(1.0))
    assert float(s1.sigma) == pytest.approx(370.0)  # first: compared with +inf → keep
    s2, _ = pol.update(s1, jnp.asarray(37.0), h_with_norm(0.4))  # 0.4 ≤ 0.5·1 → keep
    assert float(s2.sigma) == pytest.approx(370.0)
    s3, _ = pol.update(s2, jnp.asarray(37.0), h_with_norm(0.3))  # 0.3 > 0.2 → ×10
    assert float(s3.sigma) == pytest.approx(3700.0)
    assert float(s3.eps) == pytest.approx(1e-7)
    assert pol.multiplier_bound == 1e20


def test_alpaqa_per_constraint_rule():
    pol = policies.alpaqa()
    s0 = pol.init(jnp.asarray(3.0), jnp.zeros((2, 3, 4)))
    np.testing.assert_allclose(s0.sigma, 20 * 3.0)
    h = np.zeros((2, 3, 4))
    h.flat[:3] = [1.0, 0.5, 0.01]
    s1, _ = pol.update(s0, jnp.asarray(3.0), jnp.asarray(h))
    # first update: every σ_i ← max(1, 10|h_i|/‖h‖∞)·σ_i
    expect = 60 * np.maximum(1, 10 * np.abs(h) / 1.0)
    np.testing.assert_allclose(s1.sigma, expect)
    h2 = h.copy()
    h2.flat[:3] = [0.05, 0.4, 0.01]  # i=0 dropped below θ|h_old| → kept; i=1,2 did not → grown
    s2, _ = pol.update(s1, jnp.asarray(3.0), jnp.asarray(h2))
    grow = np.abs(h2) > 0.1 * np.abs(h)
    factor = np.maximum(1, 10 * np.abs(h2) / 0.4)
    np.testing.assert_allclose(s2.sigma, np.where(grow, np.minimum(1e9, factor * expect), expect))
    assert float(s2.eps) == pytest.approx(0.01)
    assert pol.multiplier_bound == 1e9


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="policy"):
        policies.get_policy("lancelott")
    assert math.isinf(policies.get_policy("bertsekas").multiplier_bound)


@pytest.mark.parametrize("name", ["bertsekas", "algencan"])
def test_no_penalty_growth_once_feasible(name):
    """Round-off fluctuations of an already feasible h do not raise β."""
    pol = policies.get_policy(name)
    states, _ = run(pol, 5.0, [1e-13, 1e-12, 1e-11])
    assert len({float(s.sigma) for s in states}) == 1


@pytest.mark.parametrize("policy", [policies.bertsekas(beta_max=1e3), policies.lancelot(beta_max=1e3),
                                    policies.algencan(beta_max=1e3), policies.alpaqa(max_penalty=1e3)],
                         ids=lambda p: p.name)
def test_growth_never_lowers_a_penalty_above_the_cap(policy):
    """σ raised past the cap (by the forward-loss safeguard) stays there when
    the rule next asks to grow it; min(γσ, cap) alone would cut it to the cap."""
    s = policy.init(jnp.asarray(5.0), jnp.zeros((2, 3, 4)))
    s = s._replace(sigma=jnp.full_like(s.sigma, 1e4))
    for _ in range(2):  # ‖h‖ = 1 twice: every rule grows σ by the second call
        s, _ = policy.update(s, jnp.asarray(5.0), h_with_norm(1.0))
    np.testing.assert_array_equal(s.sigma, 1e4)


@pytest.mark.parametrize(
    "sigma_new, sigma_old, fwd, lifted, expect",
    [
        (1e3, 1e3, 3.0, 1.0, 1e4),  # forward loss 3× the lifted: past the cap
        (1e3, 1e3, 1.9, 1.0, 1e3),  # within (1 + 1)×: the policy's σ
        (1e4, 1e2, 5.0, 1.0, 1e4),  # the policy already grew σ further
        (1e12, 1e12, 5.0, 1.0, 1e12),  # the ceiling
        (1e3, 1e3, 0.0, 0.0, 1e3),  # both zero (an interpolating fit)
    ],
)
def test_forward_loss_safeguard(sigma_new, sigma_old, fwd, lifted, expect):
    """σ grows 10× past a policy's cap when the forward pass's loss exceeds
    (1 + κ)·the lifted loss (κ = 1), and only then."""
    got = safeguard_penalty(jnp.asarray(sigma_new), jnp.asarray(sigma_old), jnp.asarray(fwd), jnp.asarray(lifted), 1.0)
    assert float(got) == expect


def test_forward_loss_safeguard_per_constraint():
    old = jnp.asarray([1.0, 1e3, 1e12])
    got = safeguard_penalty(old, old, jnp.asarray(3.0), jnp.asarray(1.0), 1.0)
    np.testing.assert_array_equal(got, [10.0, 1e4, 1e12])


@pytest.mark.parametrize(
    "sigma_new, sigma_old, stall, expect, stall_after",
    [
        (1e3, 1e3, 9, 1e3, 9),  # one subproblem short of the limit (10)
        (1e3, 1e3, 10, 1e4, 0),  # stalled: 10× past the cap, the count restarts
        (1e5, 1e3, 10, 1e5, 0),  # the policy (or the gap safeguard) already went further
        (1e6, 1e6, 10, 1e6, 0),  # the ceiling
        (3e5, 3e5, 12, 1e6, 0),  # capped at the ceiling, not 3e6
    ],
)
def test_stall_safeguard(sigma_new, sigma_old, stall, expect, stall_after):
    """After `max_stall` subproblems without a new low of the forward loss,
    σ grows 10× past a policy's cap up to 1e6, and only then."""
    got, count = stall_penalty(jnp.asarray(sigma_new), jnp.asarray(sigma_old), jnp.asarray(stall), 10)
    assert float(got) == expect and int(count) == stall_after
