"""The outer augmented Lagrangian solver with an optax-style init/update.

    state = solver.init(model, x, y)
    state, info = solver.update(state, x, y)     # one inner iteration

Each `update` takes one iteration of the inner solver (Levenberg–Marquardt
by default, see `alm_jax.inner`) on the current subproblem min_x L_σ(x, λ).
When the subproblem is solved
(‖∇_x L_σ‖ ≤ ε_k at the point the iteration started from, so that the
Levenberg–Marquardt solvers take the gradient from the linearisation their
step is built on instead of another forward and backward pass) or its
iteration cap is reached, the same call performs the outer step at the
new point:

    λ ← clip(λ + σ ⊙ h(x), ±bound)    (if the policy says so; or the
                                       states' adjoint, `multipliers`)
    σ, ε ← policy(σ, ε, h)

and starts the next subproblem. Everything is a pure function of a pytree
state, so `jax.jit(solver.update)` compiles the whole iteration.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from . import _lifted, _precision
from ._chain import ChainSpec
from ._models import to_chain, to_model
from ._checks import check_choice, check_int, check_positive, check_xy
from ._inner import InnerSolver, Problem, get_inner
from ._losses import get_loss
from ._policies import Policy, get_policy


# The penalty the forward-loss safeguard may raise σ to, past a policy's cap.
_SIGMA_CEILING = 1e12
# The penalty the stall safeguard (`alm`'s `max_stall`) may raise σ to.
_STALL_CEILING = 1e6
# `alm`'s `reshoot_above`: the forward-loss safeguard re-shoots instead of raising σ past it.
RESHOOT_ABOVE = 1e5


class ALMState(eqx.Module):
    """Solver state: a pytree of arrays plus the static model description."""

    params: Any  # DenseParams for an eqx.nn.MLP, per-layer weights for a layer chain
    states: jax.Array  # (N, m, width) lifted hidden states ((1, m, D) for a layer chain)
    multipliers: jax.Array  # same shape as states
    policy: Any  # the policy's own state; has .sigma and .eps
    inner: Any  # the inner solver's state (e.g. LM damping)
    inner_step: jax.Array  # iterations in the current subproblem
    outer_step: jax.Array  # completed outer iterations
    step: jax.Array  # total update calls
    converged: jax.Array
    best_loss: jax.Array  # the least Σℓ of the forward pass at the end of a subproblem
    stall: jax.Array  # subproblems since `best_loss` last fell
    spec: Any = eqx.field(static=True)  # ChainSpec or LayerSpec

    @property
    def model(self):
        """The current weights as the user's model (`eqx.nn.MLP`, or `eqx.nn.Sequential` for a layer chain)."""
        return to_model(self.params, self.spec)

    @property
    def beta(self):
        """Reference penalty (max over constraints for per-constraint policies)."""
        return jnp.max(self.policy.sigma)

    @property
    def eps(self):
        return self.policy.eps


class ALMInfo(NamedTuple):
    """Diagnostics of one `update` call (all scalars)."""

    objective: jax.Array  # L_σ at the new point
    loss: jax.Array  # mean training loss ℓ of the true forward pass (½·mean‖ŷ − y‖² if squared)
    mse: jax.Array  # training MSE of the true forward pass's predictions (softmax for cross-entropy)
    h_norm: jax.Array  # ‖h‖₂ of the lifted states
    beta: jax.Array
    damping: jax.Array  # the inner solver's damping or step size (NaN if none)
    grad_norm: jax.Array  # ‖∇_x L_σ‖₂ at the point the update started from
    accepted: jax.Array
    outer_step: jax.Array
    converged: jax.Array


class ALMSolver(NamedTuple):
    """An optax-style pair of pure functions (see `alm`)."""

    init: Any
    update: Any


def _uses_adjoint(multipliers, spec) -> bool:
    """Whether the outer step takes the adjoint multipliers (`alm`'s `multipliers`; spec is static)."""
    if multipliers == "auto":
        return isinstance(spec, ChainSpec) and spec.depth >= 2
    return multipliers == "adjoint"


def safeguard_penalty(sigma_new, sigma_old, loss_forward, loss_lifted, max_gap):
    """σ after the forward-loss safeguard (see `alm`'s `max_loss_gap`).

    If Σℓ of the forward pass exceeds (1 + max_gap)·Σℓ at the lifted states,
    σ ← max(σ_policy, min(10σ_old, 1e12)); otherwise the policy's σ.
    """
    drift = loss_forward > (1 + max_gap) * loss_lifted + jnp.finfo(loss_lifted.dtype).tiny
    raised = jnp.maximum(sigma_new, jnp.minimum(10 * sigma_old, _SIGMA_CEILING))
    return jnp.where(drift, raised, sigma_new)


def reshoot(params, spec, x, y, Z, Lam, Z_forward, now):
    """The states and multipliers after re-shooting where `now` (see `alm`'s `reshoot_above`).

    Re-shooting puts the states on the forward pass of `params`, `Z_forward`
    (h = 0), and the multipliers at backpropagation's adjoint there;
    otherwise (Z, λ) is kept.
    """
    def shoot(_):
        return Z_forward, _lifted.adjoint_multipliers(params, spec, x, y, jnp.zeros_like(Z_forward))

    return jax.lax.cond(now, shoot, lambda _: (Z, Lam), None)


def stall_penalty(sigma_new, sigma_old, stall, max_stall):
    """σ after the stall safeguard (see `alm`'s `max_stall`), and the stall count after it.

    After `max_stall` subproblems without a new low of the forward pass's
    loss, σ ← max(σ_policy, min(10σ_old, 1e6)) and the count restarts.
    """
    stalled = stall >= max_stall
    raised = jnp.maximum(sigma_new, jnp.minimum(10 * sigma_old, _STALL_CEILING))
    return jnp.where(stalled, raised, sigma_new), jnp.where(stalled, 0, stall)


def alm(
    policy=None,
    *,
    loss="squared",
    inner="cg",
    max_inner_steps: int | None = None,
    feasibility_tol: float = 1e-6,
    stationarity_tol: float = 1e-6,
    max_loss_gap: float | None = 1.0,
    max_stall: int | None = 10,
    multipliers: str = "auto",
    reshoot_above: float | None = RESHOOT_ABOVE,
    matmul_precision: str | None = _precision.DEFAULT,
    **inner_options,
) -> ALMSolver:
    """Augmented Lagrangian training of a lifted MLP.

    The lifted problem min Σℓ(ŷ, y) s.t. h = 0 (ℓ = ½‖ŷ − y‖² by default) (DESIGN.md §1) is solved by the
    method of multipliers: each outer step minimises
    L_σ = ½‖F‖² + ⟨λ, h⟩ + ½Σσ_i h_i² with the inner solver to
    ‖∇L_σ‖ ≤ ε (or `max_inner_steps`), then updates λ ← λ + σh and (σ, ε)
    by `policy`. A loss other than least squares enters the inner
    Gauss–Newton/LM steps through its Hessian factor (generalised
    Gauss–Newton, `alm_jax.losses`).

    Args:
        policy: None for the library's default (`alm_jax.policies.default()`,
            Bertsekas' rule with β capped at 1e3), "bertsekas", "lancelot",
            "algencan", "alpaqa" (published defaults), or a `Policy` from
            `alm_jax.policies`.
        loss: the training loss: "squared" (½‖ŷ − y‖², the default) or
            "softmax_cross_entropy" (one-hot y, the model's outputs are
            logits; treated by generalised Gauss–Newton), or a `Loss` from
            `alm_jax.losses`.
        inner: the subproblem solver: "cg" (the default: Levenberg–Marquardt
            with CG on the reduced weight system, matrix free), "lm" (the
            same with the exact structured step), "gn", "lbfgs", "adam",
            "bcd", or an `InnerSolver` from `alm_jax.inner`. "cg" trained
            lower than "lm" on 5 of the 6 UCI sets at equal time
            (benchmarks/RESULTS.md).
        max_inner_steps: cap on inner iterations per subproblem; default the
            inner solver's own: 3 for lm/gn/cg, and 1 for cg where the
            multipliers are the adjoint's (see `alm_jax.inner.cg`).
        feasibility_tol, stationarity_tol: convergence when ‖h‖∞ and
            ‖∇L_σ‖ fall below them at the end of a subproblem.
        max_loss_gap: safeguard κ on the penalty cap. When a subproblem
            ends with the forward pass's loss above (1 + κ) times the
            lifted loss Σℓ at the states, the penalty is too small to hold
            the states to the network: σ ← 10σ then, past the policy's own
            cap, up to `reshoot_above` (1e12 with it off). With the default cap (β_max = 1e3) a 4×16
            network on UCI concrete otherwise drifted to a lifted loss of
            3e-4 while its forward-pass MSE rose to 4.7 (benchmarks/RESULTS.md).
            None turns the safeguard off.
        max_stall: a second safeguard on the cap. After `max_stall`
            subproblems in a row end without a new low of the forward
            pass's loss, σ ← 10σ past the policy's cap, up to 1e6: at the
            capped penalty the multiplier iteration had stopped converging.
            On UCI power-plant (1×50, β = 1e3) ‖h‖ then grew from 5e-3 to
            9e-2 while the training MSE rose from 0.0456 to 0.0477 over
            the second half of a 60 s run. With the safeguard, 60 s runs on
            kin8nm ended at 0.0474 instead of 0.0485 (3 splits); power-plant
            and 10 s runs were unchanged within noise (benchmarks/RESULTS.md,
            Round 10). None turns it off.
        multipliers: the outer step's multiplier update. "first_order":
            λ ← λ + σh (Hestenes, Powell). "adjoint": λ ← the multipliers
            that make the Lagrangian stationary in the states at the new
            point, ∇_Z(Σℓ + ⟨λ, h⟩) = 0: backpropagation's adjoint at the
            lifted states, a least-squares multiplier estimate that is exact
            here because ∂h/∂Z is square and invertible. Both give the same
            λ where a subproblem is solved exactly in the states; otherwise
            λ + σh − λ_adjoint = (∂h/∂Z)⁻ᵀ∇_Z L_σ, the subproblem's
            remaining state gradient. "auto" (the default): "adjoint" for an
            `eqx.nn.MLP` with two or more hidden layers, "first_order"
            otherwise. At equal time (benchmarks/RESULTS.md, Rounds 13 and
            15) "adjoint" trained lower on deep networks: 8×8 and 16×8 on UCI
            concrete (0.31–0.56×, 0.82×), 4×16 yacht (0.17×), teacher–student
            8×8 and 16×8 (0.89–0.99×), 4×16 concrete within noise (0.99×
            in Round 15, 1.09–1.19× in Round 13); with one hidden layer it was
            mixed (wine 0.91×, yacht 0.76×, energy 1.16×, kin8nm 1.04×).
            The multipliers start at 0 either way.
        reshoot_above: where the forward-loss safeguard (`max_loss_gap`)
            would raise σ past this value, it re-shoots instead: σ is kept,
            the states are set to the forward pass of the current weights
            (h = 0) and the multipliers to backpropagation's adjoint there.
            Raising σ without end let a 16×8 network on UCI concrete reach
            σ = 1e10 at weights whose forward map was ill conditioned
            (training-MSE Hessian λ_max up to 2.6e9); re-shooting past 1e5
            trained 0.65× as low there at 30 s (10 splits, lower on 9;
            benchmarks/RESULTS.md, Round 29). None turns it off.
        matmul_precision: precision of the matrix products in `init` and
            `update`, a `jax.default_matmul_precision` name. The default,
            "highest", multiplies float32 in float32. On an H100, JAX's own
            default (None here) multiplies float32 in TF32, and the float32
            structured step then missed its accuracy bound κ·ε₃₂
            (tests/test_float32.py), and float32 kin8nm trained to 0.0489
            against 0.0462 in full precision (one split, 10 s; RESULTS.md,
            Round 19). Float64 and CPU arithmetic are the same either way.
        **inner_options: options of the named inner solver, e.g.
            `state_damping_ratio`, `init_damping`, `rtol`, `second_order`,
            `curvature_samples` for "cg" or
            `chunk_size`, `linear_solver` for "lm" (see `alm_jax.inner`).

    Returns:
        `ALMSolver(init, update)`.

    References:
        M. R. Hestenes (1969), M. J. D. Powell (1969): method of multipliers;
        D. P. Bertsekas, "Constrained Optimization and Lagrange Multiplier
        Methods" (1982): multiplier estimates other than the first-order
        update;
        J. Albersmeyer, M. Diehl, "The lifted Newton method and its
        application in optimization", SIAM J. Optim. 20 (2010).
    """
    pol: Policy = get_policy(policy)
    loss_fn = get_loss(loss)
    solver: InnerSolver = get_inner(inner, **inner_options)
    if max_inner_steps is not None:
        max_inner_steps = check_int("max_inner_steps", max_inner_steps)
    check_positive("feasibility_tol", feasibility_tol)
    check_positive("stationarity_tol", stationarity_tol)
    if max_loss_gap is not None:
        check_positive("max_loss_gap", max_loss_gap, allow_zero=True)
    max_stall = check_int("max_stall", max_stall, allow_none=True)
    if reshoot_above is not None:
        check_positive("reshoot_above", reshoot_above)
    # Re-shooting replaces the forward-loss safeguard's raise, so it needs the safeguard on.
    reshooting = max_loss_gap is not None and reshoot_above is not None
    check_choice("multipliers", multipliers, ("auto", "first_order", "adjoint"))
    _precision.check_matmul_precision(matmul_precision)
    bound = pol.multiplier_bound

    @functools.partial(jax.jit, static_argnums=3)
    def _start(params, x, y, spec):
        # Jitted: run eagerly, these few ops cost seconds of dispatch.
        Z = _lifted.forward_states_stacked(params, spec, x)
        Lam = jnp.zeros_like(Z)
        f0 = _lifted.total_loss(params, spec, Z, y)
        pstate = pol.init(f0, jnp.zeros_like(Z))
        istate = solver.init(params, Z, Problem(spec, x, y, Lam, pstate.sigma))
        return Z, Lam, pstate, istate, jnp.full_like(f0, jnp.inf)

    def init(model, x, y) -> ALMState:
        params, spec = to_chain(model, x)
        spec = dataclasses.replace(spec, loss=loss_fn)
        x, y = check_xy(spec, x, y)
        with _precision.matmul_precision(matmul_precision):
            Z, Lam, pstate, istate, best = _start(params, x, y, spec)
        zero = jnp.asarray(0, jnp.int32)
        return ALMState(
            params=params, states=Z, multipliers=Lam, policy=pstate, inner=istate,
            inner_step=zero, outer_step=zero, step=zero, converged=jnp.asarray(False),
            best_loss=best, stall=zero, spec=spec,
        )

    def _inner_cap(spec) -> int:
        if max_inner_steps is not None:
            return max_inner_steps
        if solver.adjoint_max_steps is not None and _uses_adjoint(multipliers, spec):
            return solver.adjoint_max_steps
        return solver.default_max_steps

    def update(state: ALMState, x, y) -> tuple[ALMState, ALMInfo]:
        with _precision.matmul_precision(matmul_precision):
            return _update(state, x, y)

    def _update(state: ALMState, x, y) -> tuple[ALMState, ALMInfo]:
        spec = state.spec
        x, y = check_xy(spec, x, y)
        Lam, sigma = state.multipliers, state.policy.sigma
        res = solver.step(state.params, state.states, state.inner, Problem(spec, x, y, Lam, sigma))
        params, Z = res.params, res.states

        gnorm = res.grad_norm
        if gnorm is None:
            grad = jax.grad(_lifted.augmented_lagrangian_stacked, argnums=(0, 1))(
                state.params, state.states, spec, x, y, Lam, sigma)
            gnorm = optax.tree_utils.tree_norm(grad)
        inner_step = state.inner_step + 1
        inner_done = (gnorm <= state.policy.eps) | (inner_step >= _inner_cap(spec))

        h = _lifted.constraints_stacked(params, spec, x, Z)
        f = _lifted.total_loss(params, spec, Z, y)
        Z_forward = _lifted.forward_states_stacked(params, spec, x)
        out = _lifted.output_stacked(params, spec, Z_forward)
        loss_fwd = spec.loss.value(out, y)
        loss_sum = jnp.sum(loss_fwd)
        new_pol, upd = pol.update(state.policy, f, h)
        if max_loss_gap is not None:
            raised = safeguard_penalty(new_pol.sigma, state.policy.sigma, loss_sum, f, max_loss_gap)
            if reshooting:
                top = jnp.max(raised)
                shoot = inner_done & (top > jnp.max(new_pol.sigma)) & (top > reshoot_above)
                raised = jnp.where(shoot, new_pol.sigma, raised)
            new_pol = new_pol._replace(sigma=raised)
        improved = loss_sum < state.best_loss
        best_loss = jnp.minimum(state.best_loss, loss_sum)
        stall = jnp.where(improved, 0, state.stall + 1)
        if max_stall is not None:
            raised, stall = stall_penalty(new_pol.sigma, state.policy.sigma, stall, max_stall)
            new_pol = new_pol._replace(sigma=raised)
        adjoint = _uses_adjoint(multipliers, spec)
        if adjoint:
            # Computed on every update and kept only at a subproblem's end,
            # as the first-order update is (`pick` below). Rolled out with
            # defects 0 instead of h, the same pass gives the re-shoot's
            # multipliers, so the adjoint is compiled once.
            lam_adj = _lifted.adjoint_multipliers(params, spec, x, y, jnp.where(shoot, 0, h) if reshooting else h)
            lam_new = lam_adj
        else:
            lam_new = Lam + sigma * h
        if math.isfinite(bound):
            lam_new = jnp.clip(lam_new, -bound, bound)
        lam_new = jnp.where(upd, lam_new, Lam)
        converged = inner_done & (jnp.max(jnp.abs(h)) <= feasibility_tol) & (gnorm <= stationarity_tol)

        def pick(a, b):
            return jax.tree_util.tree_map(lambda u, v: jnp.where(inner_done, u, v), a, b)

        new_lam, new_pstate = pick(lam_new, Lam), pick(new_pol, state.policy)
        if reshooting and adjoint:
            Z, new_lam = jnp.where(shoot, Z_forward, Z), jnp.where(shoot, lam_adj, new_lam)
        elif reshooting:
            Z, new_lam = reshoot(params, spec, x, y, Z, new_lam, Z_forward, shoot)
        restarted = solver.restart(res.state, params, Z, Problem(spec, x, y, new_lam, new_pstate.sigma))

        new_state = ALMState(
            params=params, states=Z, multipliers=new_lam, policy=new_pstate,
            inner=pick(restarted, res.state),
            inner_step=jnp.where(inner_done, 0, inner_step),
            outer_step=state.outer_step + inner_done.astype(jnp.int32),
            step=state.step + 1, converged=state.converged | converged,
            best_loss=jnp.where(inner_done, best_loss, state.best_loss),
            stall=jnp.where(inner_done, stall, state.stall), spec=spec,
        )
        info = ALMInfo(
            objective=f + jnp.sum(Lam * h) + 0.5 * jnp.sum(sigma * h * h),
            loss=jnp.mean(loss_fwd),
            mse=jnp.mean((spec.loss.predict(out) - y) ** 2),
            h_norm=jnp.sqrt(jnp.sum(h * h)),
            beta=jnp.max(new_state.policy.sigma),
            damping=res.damping,
            grad_norm=gnorm,
            accepted=res.accepted,
            outer_step=new_state.outer_step,
            converged=new_state.converged,
        )
        return new_state, info

    return ALMSolver(init, update)
