"""Levenberg–Marquardt on the ALM subproblem min ½‖F_σ(θ, Z)‖² (`lm`, and `cg` matrix free).

One iteration: the structured step with damping μ on the weights and ratio·μ
on the states, the gain ratio

    ρ = (f(x) − f(x + d)) / (½‖r‖² − ½‖r + J d‖²)

with f = L_σ/β (`_lifted.merit`; ½‖r‖² for the squared loss)

and Nielsen's damping update: on success (ρ > η) μ ← μ·max(1/3, 1 − (2ρ−1)³),
ν ← 2; on failure μ ← νμ, ν ← 2ν. A trial point with a non-finite step or
objective is rejected like any failed step. A step from a subsample of the
data (`curvature_samples`) is first shortened to the minimiser of the model
along it where that is shorter (`_model_length`). Two trial points share the step's
weights: the states Z + dZ, and the states rolled out through the new weights
with the constraint values the linear model predicts (`rollout`); the lower
one is judged.

The step solves the damped linear least-squares problem either exactly
(Cholesky of the reduced weight system, `_schur`) or inexactly by CG on it
(`_matfree`, truncated Gauss–Newton) with the forcing term
η = min(η_max, √‖∇f‖), η_max = 0.1, of Dembo, Eisenstat & Steihaug; `auto`
picks CG when the reduced system would not fit in memory.

References:
    H. B. Nielsen, "Damping parameter in Marquardt's method", IMM-REP-1999-05;
    K. Madsen, H. B. Nielsen, O. Tingleff, *Methods for Non-Linear Least
    Squares Problems*, 2004, §3.2;
    R. S. Dembo, S. C. Eisenstat, T. Steihaug, "Inexact Newton methods",
    SIAM J. Numer. Anal. 19 (1982); Nocedal & Wright, Algorithm 7.1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .._checks import check_choice, check_int, check_positive, check_solve_dtype
from .._lifted import constraints_stacked, forward_states_stacked, lifted_residual, merit, penalty_split
from .._linalg import explicit_fits, matfree_step, structured_step
from .._layers import LayerSpec
from .._linalg import _curvature, _generic
from .._linalg._linearise import linearise
from .._linalg._model import StepModel, step_model
from .._linalg._matfree import FORCING_MAX
from .._linalg._schur import num_weights
from ._base import NIELSEN_DECREASE, InnerResult, InnerSolver, Problem, nielsen, tree_add, tree_where

LINEAR_SOLVERS = ("auto", "cholesky", "cg")
# `adapt_cap`: the limit's floor, the average's weight, and the acceptance
# rates below which the limit halves and above which it doubles.
_CAP_MIN, _CAP_WEIGHT, _CAP_SHRINK, _CAP_GROW = 10, 0.2, 0.5, 0.8
# `curvature_samples="auto"`: samples per weight in CG's subsample.
AUTO_SAMPLES_PER_WEIGHT = 4
# `second_order="auto"`, `solve_dtype="auto"`: what a one-hidden-layer MLP with
# P ≤ m·n_out gets when CG's products run over every sample (`auto_one_layer`).
AUTO_SECOND_ORDER = 0.5
AUTO_SOLVE_DTYPE = "float32"
# `cg`'s iterations per subproblem, and with adjoint multipliers (`cg`'s docstring).
DEFAULT_MAX_STEPS, ADJOINT_MAX_STEPS = 3, 1


class LMOptions(NamedTuple):
    state_damping_ratio: float = 1e-6
    accept_ratio: float = 1e-4
    damping_min: float = 1e-12
    damping_max: float = 1e12
    chunk_size: int | None = None
    linear_solver: str = "cholesky"
    cg_rtol: float | None = None  # None: the forcing term min(cg_forcing_max, √‖∇f‖)
    cg_forcing_max: float = FORCING_MAX
    cg_max_steps: int = 100
    precondition: bool | None = None  # None: the Kronecker preconditioner where the model allows it
    solve_dtype: str | None = None  # CG's dtype; None: the model's; "auto": `resolve_auto`
    rollout: bool = True
    backtrack: bool = False
    second_order: float | str = 0.0  # the curvature term's weight when it is on; 0: Gauss–Newton throughout
    adapt_cg_steps: bool = False  # CG's product limit adapted between iterations (`adapt_cap`)
    damping_decrease: float = NIELSEN_DECREASE  # the smallest factor μ is multiplied by after a successful step
    curvature_samples: int | str | None = None  # CG's subsample (`curvature_stride`); None: every sample


class LMResult(NamedTuple):
    params: object
    states: jnp.ndarray
    damping: jnp.ndarray
    nu: jnp.ndarray
    accepted: jnp.ndarray
    objective: jnp.ndarray  # ½‖F_σ‖² at the returned point
    grad_norm: jnp.ndarray  # ‖∇L_σ‖ at the point the iteration started from
    curvature_weight: jnp.ndarray | None = None
    cg_cap: tuple | None = None  # (CG's product limit, acceptance rate) for the next step (`adapt_cg_steps`)


class LMState(NamedTuple):
    damping: jnp.ndarray
    nu: jnp.ndarray
    beta: jnp.ndarray  # the reference penalty the damping was adapted at
    curvature_weight: jnp.ndarray | None = None  # τ of the next step (`second_order`)
    cg_cap: tuple | None = None  # (CG's product limit, acceptance rate) for the next step (`adapt_cg_steps`)
    sample_offset: jnp.ndarray | None = None  # the first sample of CG's next subsample (`curvature_samples`)


def on_accelerator() -> bool:
    """Whether JAX's default device (`jax.default_device`, else the default backend) is not a CPU.

    The "auto" options are read at trace time, where the arrays' device is
    not known. On an H100 an update's time was set by kernel launches, not
    by m: about 100 per second from m = 277 to 8,611 (benchmarks/RESULTS.md,
    Round 19). A subsample or float32 CG then saves no time and costs step
    quality, so there "auto" uses every sample in the model's dtype (Round 25).
    """
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend() != "cpu"
    return (device if isinstance(device, str) else device.platform) != "cpu"


def curvature_stride(samples, spec, m: int) -> int:
    """k of CG's subsample, every k-th sample: ⌊m/b⌋ for b = `samples` (4 per weight for "auto"), at least 1.

    "auto" leaves a general layer chain alone (it has no subsampled
    products); an explicit count that subsamples one is refused at `init`.
    On an accelerator `resolve_auto` has already made "auto" None.
    """
    if samples is None or (samples == "auto" and isinstance(spec, LayerSpec)):
        return 1
    b = AUTO_SAMPLES_PER_WEIGHT * num_weights(spec) if samples == "auto" else samples
    return max(1, m // b)


def auto_one_layer(opts: LMOptions, spec, m: int) -> bool:
    """Whether "auto" turns on the curvature term (and, on a CPU, float32 CG): one hidden layer, P ≤ m·n_out, every sample in CG.

    Both paid on the 1×50 UCI sets whose products use every sample and
    cost most of an update (m < 8P) and whose residuals stay large; where
    the products are subsampled they are cheap and the pair cost 1.5–2 %.
    With fewer residuals than weights the network can interpolate, the
    residuals fall towards zero, the curvature term with them, and float32
    CG's floor κ(S)·ε₃₂ binds: UCI yacht (m = 277, P = 401) trained 3.7×
    higher (benchmarks/RESULTS.md, Round 22). Deeper networks have no
    curvature term, and float32 CG trained higher on them (Rounds 8, 19;
    1.5–3.0× on 8×8 and 16×8 nets in Round 31).
    """
    return (not isinstance(spec, LayerSpec) and spec.depth == 1 and num_weights(spec) <= m * spec.n_out
            and curvature_stride(opts.curvature_samples, spec, m) == 1)


def resolve_auto(opts: LMOptions, spec, m: int) -> LMOptions:
    """`opts` with "auto" replaced by the values for this model, data and device (`on_accelerator`).

    On an accelerator `curvature_samples` takes every sample and CG runs in
    the model's dtype; elsewhere the CPU's rules (`curvature_stride`,
    `auto_one_layer`).
    """
    accelerated = on_accelerator()
    if opts.curvature_samples == "auto" and accelerated:
        opts = opts._replace(curvature_samples=None)
    if opts.second_order != "auto" and opts.solve_dtype != "auto":
        return opts
    on = auto_one_layer(opts, spec, m)
    if opts.second_order == "auto":
        opts = opts._replace(second_order=AUTO_SECOND_ORDER if on else 0.0)
    if opts.solve_dtype == "auto":
        opts = opts._replace(solve_dtype=AUTO_SOLVE_DTYPE if on and not accelerated else None)
    return opts


def initial_damping(params, spec, x, y, Z, Lam, sigma, tau=1e-3):
    """μ_0 = τ·max diag(J_θᵀJ_θ), the usual Levenberg–Marquardt start."""
    if isinstance(spec, LayerSpec):
        return _generic.initial_damping(params, spec, x, y, Z, Lam, sigma, tau)
    lin = linearise(params, spec, x, y, Z, Lam, sigma)
    d_in = jnp.einsum("ma,mk->ak", lin.c_h[0] ** 2, lin.zt_in**2)
    d_hid = jnp.einsum("gma,gmk->gak", lin.c_h[1:] ** 2, lin.zt_hid**2)
    d_out = jnp.einsum("mab,mk->bk", lin.c_o**2, lin.zt_out**2)
    top = jnp.maximum(jnp.max(d_in), jnp.max(d_out))
    if d_hid.size:
        top = jnp.maximum(top, jnp.max(d_hid))
    return tau * jnp.maximum(top, jnp.finfo(top.dtype).tiny)


def resolve_linear_solver(name: str, spec) -> str:
    if name == "auto":
        return "cholesky" if explicit_fits(spec) else "cg"
    return name


def damped_step(params, Z, spec, x, y, Lam, sigma, mu_w, mu_z, opts: LMOptions, curvature_weight=None):
    """The structured step, exact or by CG, for damping (μ_w, μ_z) (and a curvature weight τ, CG only)."""
    return _counted_step(params, Z, spec, x, y, Lam, sigma, mu_w, mu_z, opts, curvature_weight)[:2]


def _counted_step(params, Z, spec, x, y, Lam, sigma, mu_w, mu_z, opts: LMOptions, curvature_weight=None, cap=None,
                  offset=0):
    """`damped_step` and CG's product count (0 for the exact step), at most `cap` products if given."""
    if resolve_linear_solver(opts.linear_solver, spec) == "cholesky":
        dp, dz = structured_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, opts.chunk_size)
        return dp, dz, jnp.zeros((), jnp.int32)
    rtol = None if opts.cg_rtol is None else jnp.asarray(opts.cg_rtol, spec.dtype)
    return matfree_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol, max_steps=opts.cg_max_steps,
                        precondition=opts.precondition, forcing_max=opts.cg_forcing_max,
                        solve_dtype=opts.solve_dtype, curvature_weight=curvature_weight, cap=cap,
                        stride=curvature_stride(opts.curvature_samples, spec, x.shape[0]), offset=offset)


def adapt_cap(cap, steps, accepted, cap_max):
    """CG's next product limit from the acceptance of the steps CG ended at its limit.

    `cap` is (limit, a), a an exponential average (weight 1/5) of whether
    such steps were accepted. Below a = 1/2 the limit halves (down to 10),
    above a = 4/5 it doubles (up to `cap_max`); steps CG ended on its
    tolerance leave both alone. CG's iterates from 0 grow in norm (Steihaug
    1983), so a lower limit gives a shorter step, as a smaller trust region
    would. Where the residuals stay large, capped steps were mostly
    rejected (8×8 network, UCI concrete: median ρ ≈ 0) and shorter ones
    pay; on near-zero-residual fits they were accepted at ρ ≈ 0.5–1 (4×16,
    UCI yacht) and the full limit pays. Averaging keeps one unlucky step
    from halving the limit: halving after every rejected capped step locked
    yacht into alternating rejected 100-product and accepted 50-product
    steps (benchmarks/RESULTS.md, Round 16).
    """
    limit, rate = cap
    hit = steps >= limit
    rate = jnp.where(hit, (1 - _CAP_WEIGHT) * rate + _CAP_WEIGHT * accepted.astype(rate.dtype), rate)
    limit = jnp.where(hit & (rate > _CAP_GROW), jnp.minimum(2 * limit, cap_max), limit)
    limit = jnp.where(hit & (rate < _CAP_SHRINK), jnp.maximum(limit // 2, min(_CAP_MIN, cap_max)), limit)
    return limit.astype(jnp.int32), rate


def _step_model(params, Z, spec, x, y, Lam, sigma, dp, dz, rollout, second_order=False) -> StepModel:
    """f and ‖∇f‖ at the current point, the model's decrease along d, its slope rᵀJ d, h + J_h d and h (for a
    layer chain the last two are None unless `rollout`)."""
    if not isinstance(spec, LayerSpec):
        lin = linearise(params, spec, x, y, Z, Lam, sigma)
        q = _curvature.curvature(lin, params, spec) if second_order else None
        return step_model(lin, spec, Lam, sigma, dp, dz, q)

    def res(p, z):
        return lifted_residual(p, z, spec, x, y, Lam, sigma)

    r0, jd = jax.jvp(res, (params, Z), (dp, dz))
    # With a GGN loss r0 is not the objective's residual, but r0ᵀJ d is
    # still its directional derivative.
    slope = jnp.sum(r0 * jd)
    pred = 0.5 * jnp.sum(r0 * r0) - 0.5 * jnp.sum((r0 + jd) ** 2)
    h = defects = None
    if rollout:
        h, jh = jax.jvp(lambda p, z: constraints_stacked(p, spec, x, z), (params, Z), (dp, dz))
        defects = h + jh
    f0, grad = jax.value_and_grad(merit, argnums=(0, 1))(params, Z, spec, x, y, Lam, sigma)
    return StepModel(f0, optax.tree_utils.tree_norm(grad), pred, defects, slope, h)


def _trial(params, Z, spec, x, y, Lam, sigma, dp, dz, model: StepModel, alpha, rollout):
    """The trial point x + αd (α None: the full step) and f there: of the states Z + α dZ and (`rollout`) those
    rolled out through the new weights with the constraint values h + α J_h d, the lower."""
    if alpha is None:
        # Not α = 1: h + 1·((h + J_h d) − h) rounds differently, and the
        # default's trajectories would change with it.
        p1, z1, defects = tree_add(params, dp), Z + dz, model.defects
    else:
        p1, z1 = tree_add(params, dp, alpha), Z + alpha * dz
        defects = None if model.defects is None else model.constraints + alpha * (model.defects - model.constraints)
    f1 = merit(p1, z1, spec, x, y, Lam, sigma)
    if rollout:
        # The states rolled out through the new weights with the
        # constraint values the model predicts,
        # z_{a+1} = φ(W'_a z_a + b'_a) + h_a + α J_h,a d. The penalty term
        # (weight β) then carries no second-order error of φ, only the
        # loss rows (weight 1) do: a second-order correction (Nocedal &
        # Wright §15.6), and the way DDP rolls out its states.
        z2 = forward_states_stacked(p1, spec, x, defects=defects)
        f2 = merit(p1, z2, spec, x, y, Lam, sigma)
        take = jnp.isfinite(f2) & ~(f2 >= f1)  # a NaN f1 loses to a finite f2
        z1, f1 = jnp.where(take, z2, z1), jnp.where(take, f2, f1)
    return p1, z1, f1


def _backtrack_length(f0, f1, slope):
    """The minimiser of the quadratic through f(0), f'(0) = rᵀJ d and f(1), kept in [0.1, 0.5] (Nocedal & Wright
    §3.5); 0.1 where f(1) is not finite."""
    curvature = f1 - f0 - slope
    alpha = -slope / (2 * jnp.where(curvature > 0, curvature, 1))
    alpha = jnp.where(jnp.isfinite(f1) & (curvature > 0), alpha, 0.1)
    return jnp.clip(alpha, 0.1, 0.5)


def _model_length(slope, pred):
    """α* = min(1, a/c), the minimiser over α ≤ 1 of the model along d; 1 where d is not a descent direction.

    Along αd the model's decrease is q(α) = αa − ½α²c with a = −rᵀJd and
    c = 2(a − q(1)), the model's curvature along d. For a step CG took on
    the model's own matrix, a ≥ c (CG's Galerkin condition), so α* = 1.
    A step from a subsample's matrix S_B can overshoot the whole problem's
    model: on UCI power-plant (k = 7) some 40 % of the steps had q(1) < 0
    and were all rejected (benchmarks/RESULTS.md, Round 23).
    """
    a, c = -slope, 2 * (-slope - pred)
    return jnp.where((a > 0) & (c > a), a / jnp.where(c > a, c, 1), 1)


def _along(alpha, slope, pred):
    """The model's decrease q(α) = −α rᵀJd − ½α²dᵀBd along αd, from its slope and its decrease q(1) = `pred`."""
    return alpha * (alpha * (pred + slope) - slope)


def lm_iteration(params, Z, spec, x, y, Lam, sigma, damping, nu, opts: LMOptions, tau=None,
                 cg_cap=None, offset=0) -> LMResult:
    dp, dz, cg_steps = _counted_step(params, Z, spec, x, y, Lam, sigma, damping, opts.state_damping_ratio * damping,
                                     opts, tau, None if cg_cap is None else cg_cap[0], offset)
    model = _step_model(params, Z, spec, x, y, Lam, sigma, dp, dz, opts.rollout, tau is not None)
    f0, gnorm, pred = model.objective, model.gradient_norm, model.predicted
    if tau is not None:
        # The decreases of the two models Dennis, Gay & Welsch's choice compares (below).
        pred_gn, pred_so = pred, pred - opts.second_order * model.second_order
        pred = pred - tau * model.second_order

    def judge(f1, pred_a):
        rho = (f0 - f1) / jnp.where(pred_a > 0, pred_a, 1)
        # A non-finite step makes J d, hence pred, non-finite (0·inf is
        # NaN in the products), and NaN > 0 is false: no separate test of
        # d is needed.
        return jnp.isfinite(f1) & (pred_a > 0) & (rho > opts.accept_ratio), rho

    subsampled = curvature_stride(opts.curvature_samples, spec, x.shape[0]) > 1
    if not opts.backtrack:
        alpha = _model_length(model.slope, pred) if subsampled else None
        p1, z1, f1 = _trial(params, Z, spec, x, y, Lam, sigma, dp, dz, model, alpha, opts.rollout)
        if subsampled:
            pred = _along(alpha, model.slope, pred)
            if tau is not None:
                pred_gn, pred_so = _along(alpha, model.slope, pred_gn), _along(alpha, model.slope, pred_so)
        ok, rho = judge(f1, pred)
        ok_full = ok
        if subsampled:
            # Nielsen's rule sees αρ, about the gain against the model d
            # came from: the subsample's predicted ≈ a/2 along d (CG's
            # Galerkin condition), the whole problem's α*a/2 at α*d. A step
            # shortened below α* = ½ is still taken, but μ then grows (by
            # up to 2×), as after a poor step.
            rho = alpha * rho
    else:
        # One shorter trial along a rejected direction, in a loop of at
        # most two passes rather than a cond, so that the trial's rollout
        # and merit are compiled once.
        one = jnp.ones((), f0.dtype)

        def again(c):
            i, ok_i = c[0], c[1]
            return (i == 0) | ((i == 1) & ~ok_i & (pred > 0))

        def trial(c):
            i, _, f_full, *_ = c
            alpha = jnp.where(i == 0, one, _backtrack_length(f0, f_full, model.slope))
            # The model's decrease along αd: −α rᵀJd − ½α²‖Jd‖² (with
            # `second_order`, ‖Jd‖² + τ dᵀC d).
            pred_a = jnp.where(i == 0, pred, _along(alpha, model.slope, pred))
            p_a, z_a, f_a = _trial(params, Z, spec, x, y, Lam, sigma, dp, dz, model, alpha, opts.rollout)
            return i + 1, judge(f_a, pred_a)[0], jnp.where(i == 0, f_a, f_full), p_a, z_a, f_a

        init = (jnp.zeros((), jnp.int32), jnp.zeros((), bool), f0, params, Z, f0)
        _, ok, f_full, p1, z1, f1 = jax.lax.while_loop(again, trial, init)
        # μ follows the full step: after a rescued one it grows as after
        # a failure (μ/α instead trained worse, benchmarks/RESULTS.md,
        # Round 11).
        ok_full, rho = judge(f_full, pred)
    new_damping, new_nu = nielsen(ok_full, rho, damping, nu, opts.damping_min, opts.damping_max,
                                  opts.damping_decrease)
    new_tau = tau
    if tau is not None:
        # Dennis, Gay & Welsch's choice: the next step uses the model
        # (Gauss–Newton or with the curvature term) that predicted this
        # step's actual decrease better.
        actual = f0 - f_full if opts.backtrack else f0 - f1
        better = jnp.abs(actual - pred_so) < jnp.abs(actual - pred_gn)
        new_tau = jnp.where(jnp.isfinite(actual) & better, opts.second_order, 0).astype(tau.dtype)
    new_cap = None if cg_cap is None else adapt_cap(cg_cap, cg_steps, ok_full, opts.cg_max_steps)
    params = tree_where(ok, p1, params)
    Z = jnp.where(ok, z1, Z)
    grad_norm = penalty_split(sigma)[0] * gnorm  # ∇L_σ = β∇f
    return LMResult(params, Z, new_damping, new_nu, ok, jnp.where(ok, f1, f0), grad_norm, new_tau, new_cap)


def _lm_solver(name, auto_opts: LMOptions, init_damping, max_steps, rescale_damping,
               adjoint_max_steps=None) -> InnerSolver:
    def init(params, Z, pb: Problem):
        opts = resolve_auto(auto_opts, pb.spec, pb.x.shape[0])
        if init_damping is None:
            mu0 = initial_damping(params, pb.spec, pb.x, pb.y, Z, pb.multipliers, pb.sigma)
        else:
            mu0 = jnp.asarray(init_damping, pb.spec.dtype)
        tau = None
        if opts.second_order:
            _curvature.check_supported(pb.spec)  # at `alm(...).init`, before any step is compiled
            tau = jnp.asarray(opts.second_order, pb.spec.dtype)
        cap = None
        if opts.adapt_cg_steps:  # set only by `cg`, whose linear solver is always CG
            cap = (jnp.asarray(opts.cg_max_steps, jnp.int32), jnp.ones((), pb.spec.dtype))
        offset = None
        if curvature_stride(opts.curvature_samples, pb.spec, pb.x.shape[0]) > 1:
            if isinstance(pb.spec, LayerSpec):
                raise ValueError("curvature_samples: a subsample for CG's products needs an eqx.nn.MLP model; "
                                 "pass None or 'auto' for a general layer chain.")
            offset = jnp.zeros((), jnp.int32)
        return LMState(mu0, jnp.asarray(2, pb.spec.dtype), jnp.max(pb.sigma).astype(pb.spec.dtype), tau, cap, offset)

    def restart(s: LMState, params, Z, pb: Problem):
        # After condensing the states, the weights' system carries the loss
        # rows at scale 1/β; keep μ_θ at the same scale relative to them.
        beta = jnp.max(pb.sigma).astype(s.beta.dtype)
        damping = s.damping * s.beta / beta if rescale_damping else s.damping
        damping = jnp.clip(damping, auto_opts.damping_min, auto_opts.damping_max)
        return LMState(damping, s.nu, beta, s.curvature_weight, s.cg_cap, s.sample_offset)

    def step(params, Z, s: LMState, pb: Problem):
        opts = resolve_auto(auto_opts, pb.spec, pb.x.shape[0])
        r = lm_iteration(params, Z, pb.spec, pb.x, pb.y, pb.multipliers, pb.sigma, s.damping, s.nu, opts,
                         s.curvature_weight, s.cg_cap, 0 if s.sample_offset is None else s.sample_offset)
        offset = s.sample_offset
        if offset is not None:  # the next subsample: k steps see every sample
            offset = (offset + 1) % curvature_stride(opts.curvature_samples, pb.spec, pb.x.shape[0])
        return InnerResult(r.params, r.states, LMState(r.damping, r.nu, s.beta, r.curvature_weight, r.cg_cap, offset),
                           r.accepted, r.damping, r.grad_norm)

    return InnerSolver(name, init, restart, step, max_steps, adjoint_max_steps)


def _check_common(state_damping_ratio, init_damping, chunk_size, max_steps, damping_decrease):
    check_positive("state_damping_ratio", state_damping_ratio, allow_zero=True)
    check_positive("damping_decrease", damping_decrease, below=1)
    if init_damping is not None:
        check_positive("init_damping", init_damping)
    return check_int("chunk_size", chunk_size, allow_none=True), check_int("max_steps", max_steps)


def lm(*, state_damping_ratio: float = 1e-6, init_damping: float | None = None, linear_solver: str = "auto",
       chunk_size: int | None = None, max_steps: int = 3, rescale_damping: bool = False,
       rollout: bool = True, backtrack: bool = False, damping_decrease: float = NIELSEN_DECREASE) -> InnerSolver:
    """Levenberg–Marquardt with the exact structured step (the default inner solver).

    d = argmin ‖J d + r‖² + μ‖dθ‖² + ratio·μ‖dZ‖², accepted by the gain ratio,
    μ adapted by Nielsen's rule and carried over between subproblems.

    Args:
        state_damping_ratio: μ_z/μ_θ; 0 gives the lifted-Newton (condensing) step.
        init_damping: μ_0; default 1e-3·max diag(J_θᵀJ_θ).
        linear_solver: "cholesky" (explicit reduced system), "cg" (matrix
            free) or "auto" (explicit when the P × P system fits in memory).
        chunk_size: samples per chunk of the explicit assembly (memory bound).
        max_steps: default iterations per subproblem.
        rescale_damping: divide μ by the penalty's growth factor when a new
            subproblem starts (μ kept in the loss's units); otherwise μ
            carries over unchanged.
        rollout: also try the trial states rolled out through the new
            weights with the linearised constraint values, and keep the
            lower trial point. Undamped state steps otherwise carry φ's
            second-order error into the penalty term at weight β: on UCI
            energy a step at μ/10 predicted a decrease of 7.7e-6 while the
            objective rose by 2.9e-3 (ρ = −377); rolled out, ρ = 0.84
            (benchmarks/RESULTS.md).
        backtrack: after a rejected step d, try once more at αd, α the
            minimiser of the quadratic through f(0), f'(0) and f(d), kept in
            [0.1, 0.5] (Nocedal & Wright §3.5), accepted by the model's gain
            ratio at α; μ grows as after the rejection. A rejected step
            otherwise wastes its whole linear solve. It trains lower per
            update where many steps are rejected and higher where few are
            (benchmarks/RESULTS.md, Rounds 11 and 12).
        damping_decrease: c in Nielsen's μ ← μ·max(c, 1 − (2ρ−1)³) after a
            successful step, the most μ may shrink by at once; Nielsen's
            1/3 by default. With 1/3, a step at ρ ≈ 1 was often followed by
            one at μ/3 with ρ between −8 and −2, and 35–40 % of the steps
            on UCI power-plant were rejected. At 10 s, c = 0.5 trained 5 %
            lower on UCI concrete and wine (1×50, 3 splits), within 1 % on
            kin8nm and power-plant, 25 % higher on energy, and 1.07–1.6×
            higher on 4×16, 8×8 and 16×8 networks on concrete at 20 s.
            With float32 CG (20 splits) it trained 0.5 % lower on kin8nm
            and power-plant, and with `second_order=0.5` as well 4 % higher
            on wine (benchmarks/RESULTS.md, Round 18).
    """
    chunk_size, max_steps = _check_common(state_damping_ratio, init_damping, chunk_size, max_steps, damping_decrease)
    check_choice("linear_solver", linear_solver, LINEAR_SOLVERS)
    opts = LMOptions(state_damping_ratio=state_damping_ratio, chunk_size=chunk_size, linear_solver=linear_solver,
                     rollout=bool(rollout), backtrack=bool(backtrack), damping_decrease=float(damping_decrease))
    return _lm_solver("lm", opts, init_damping, max_steps, bool(rescale_damping))


def cg(*, state_damping_ratio: float = 1e-6, init_damping: float | None = None, rtol: float | None = None,
       forcing_max: float = FORCING_MAX, max_cg_steps: int = 100, precondition: bool | None = None,
       max_steps: int | None = None,
       rescale_damping: bool = False, rollout: bool = True, solve_dtype="auto", backtrack: bool = False,
       second_order: float | str = "auto", adapt_cg_steps: bool = True,
       damping_decrease: float = NIELSEN_DECREASE, curvature_samples: int | str | None = "auto") -> InnerSolver:
    """Truncated Gauss–Newton: LM with CG on the reduced weight system, matrix free.

    Memory O(#weights + m·depth·width²): S is never formed. CG stops at
    relative residual `rtol` (norm-wise; see `_matfree.pcg`), by
    default the forcing term min(forcing_max, √‖∇f‖), or after
    `max_cg_steps` products. A forcing cap of 0.5 lost 1.5× on UCI kin8nm
    at 10 s; 0.03 to 0.2 trained alike (benchmarks/RESULTS.md).
    `adapt_cg_steps` (the default) lowers that limit, by halves down to 10
    products, while steps that CG ended at it are mostly rejected, and
    raises it back while they are accepted (`adapt_cap`). At 30 s it
    trained 0.45–0.95× as low on deep networks whose residuals stay large
    (4×16, 8×8 and 16×8 on UCI concrete, 8×8 teacher–student) and at 10 s
    within ±2 % on five 1×50 UCI sets, but higher on near-zero-residual
    fits that stay far below the peers (1×50 yacht 1.7×, 4×16 yacht up to
    55× on one split of three; Round 16). A fixed `max_cg_steps=30` had
    gained less on the former and cost 27–470× on the latter (Round 15).
    `precondition` (default: on for an `eqx.nn.MLP`, which has them; off
    for a general layer chain) applies per-layer Kronecker factors. Under
    lineax's componentwise stopping test it raised the CG iterations 2–6×
    on UCI energy; under the norm-wise test it trained 0.59× as low on the
    six UCI sets at 10 s (yacht 0.06×) and 0.26× on 4×16 networks
    (benchmarks/RESULTS.md). `solve_dtype` (None: the model's dtype) runs
    CG in another dtype; the forcing term, the gain ratio and the states
    stay in the model's. "auto" (the default) is float32 where
    `second_order="auto"` turns the curvature term on and JAX's default
    device is a CPU, and the model's dtype otherwise (`on_accelerator`;
    on an H100 float64 CG trained 0.89–0.98× as low on UCI energy, wine
    and concrete at 10 s, 4 splits, Round 25). With a float64 MLP, "float32" made CG products
    2.3–2.4× faster on XLA:CPU and trained 2–4 % lower at equal time on UCI
    kin8nm, power-plant, concrete and wine, but its step has a floor of
    ≈ κ(S)·ε₃₂, and where the training error falls to 1e-7 (UCI yacht,
    4×16 teacher–student) it trained 3–8× higher (benchmarks/RESULTS.md,
    Round 8). A general layer chain's CG runs in the model's dtype only.
    `second_order` τ ∈ [0, 1] (an `eqx.nn.MLP` with one hidden layer; 0
    is Gauss–Newton) adds τ times the stage rows' part of the
    Hessian term Gauss–Newton leaves out, C = Σ r_i ∇²r_i (the multipliers'
    estimate times the constraints' curvature, `_linalg/_curvature.py`):
    the step minimises ½dᵀ(JᵀJ + τC + diag(μ))d + ∇fᵀd, the gain ratio
    uses the same model, and CG stops at negative curvature. After every
    step the next one keeps τ if the model with τC predicted this step's
    actual decrease better than Gauss–Newton, else drops to Gauss–Newton
    (Dennis, Gay & Welsch 1981). It pays where the residuals stay large:
    at 10 s, τ = 0.5 trained 0.73× as low on UCI wine (5/5 splits) and
    0.95× on energy, 1.01–1.04× higher on concrete, power-plant and kin8nm
    and 1.24× on yacht; τ = 1 did less well on wine per update
    (benchmarks/RESULTS.md, Round 14). "auto" (the default) takes τ = 0.5
    with float32 CG (`solve_dtype="auto"`) for an MLP with one hidden
    layer that has at least as many residuals as weights (P ≤ m·n_out)
    and whose CG products use every sample (m < 8P), and 0 otherwise: on
    the 1×50 UCI sets the pair trained 0.74× as low on wine, 0.92× on
    energy and 0.94× on concrete, but 3.7× higher on yacht (m < P) and
    1.5–2 % higher on kin8nm and power-plant, whose products are
    subsampled (20 splits, 10 s, Round 22); `auto_one_layer`.
    `curvature_samples` b (an `eqx.nn.MLP`) builds CG's products S v, and
    the preconditioner, from every k-th sample, k = ⌊m/b⌋, from an offset
    that moves by one per step, so that k steps see every sample; the
    gradient, the forcing term, the states' step and the gain ratio use
    all samples, so the step is judged on the whole problem (subsampled
    curvature: Byrd, Chin, Neveitt & Nocedal, SIAM J. Optim. 21 (2011);
    Martens, ICML 2010). "auto" (the default) takes 4 samples per weight
    on a CPU, so only data sets with m ≥ 8P are subsampled, and every
    sample on an accelerator, where an update's time hardly grows with m
    (on an H100, 1×50 kin8nm and power-plant at 10 s trained 0.995× and
    0.994× as low with every sample, the curvature term and float64 CG,
    4 splits, Round 25); None uses every sample.
    On 1×50 networks at 10 s (20 splits) it trained 0.963× as low on UCI
    kin8nm (k = 3) and 0.940× on power-plant (k = 7), where CG's products
    took three quarters of an update; 2 samples per weight trained 2.5 %
    higher than 4 (benchmarks/RESULTS.md, Round 21). A subsampled step d
    can overshoot the whole problem's model (on power-plant some 40 % of
    them predicted an increase there and were rejected), so it is taken
    at α*d, α* = min(1, a/c) that model's minimiser along d, and Nielsen's
    rule sees α*ρ (`_model_length`); at 10 s (20 splits) this trained
    0.981× as low on kin8nm and 0.986× on power-plant (Round 23).
    `backtrack=True` keeps the full first trial.
    `max_steps` (iterations per subproblem) defaults to 3, and to 1 where
    `alm`'s outer step takes the adjoint multipliers (an MLP with two or
    more hidden layers by default): the multipliers and the penalty
    safeguards then follow every step. At 30 s that trained 0.63× as low
    on a 16×8 network on UCI concrete (10 splits, lower on 8), where the
    forward-loss safeguard then kept σ at 1e3–1e4 instead of lifting it
    to 1e5 within 20 updates (Round 31).
    The other options are `lm`'s.
    """
    # A cap the user sets holds under either multiplier update (None: `default_max_steps`).
    adjoint_max_steps = ADJOINT_MAX_STEPS if max_steps is None else None
    max_steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
    _, max_steps = _check_common(state_damping_ratio, init_damping, None, max_steps, damping_decrease)
    solve_dtype = check_solve_dtype(solve_dtype, allow_auto=True)
    max_cg_steps = check_int("max_cg_steps", max_cg_steps)
    if isinstance(second_order, str):
        check_choice("second_order", second_order, ("auto",))
    else:
        check_positive("second_order", second_order, allow_zero=True, at_most=1)
        second_order = float(second_order)
    if rtol is not None:
        check_positive("rtol", rtol)
    check_positive("forcing_max", forcing_max)
    if isinstance(curvature_samples, str):
        check_choice("curvature_samples", curvature_samples, ("auto",))
    else:
        curvature_samples = check_int("curvature_samples", curvature_samples, allow_none=True)
    opts = LMOptions(state_damping_ratio=state_damping_ratio, linear_solver="cg", cg_rtol=rtol,
                     cg_forcing_max=forcing_max, cg_max_steps=max_cg_steps,
                     precondition=None if precondition is None else bool(precondition),
                     rollout=bool(rollout), solve_dtype=solve_dtype, backtrack=bool(backtrack),
                     second_order=second_order, adapt_cg_steps=bool(adapt_cg_steps),
                     damping_decrease=float(damping_decrease), curvature_samples=curvature_samples)
    return _lm_solver("cg", opts, init_damping, max_steps, bool(rescale_damping), adjoint_max_steps)
