"""`fit`: the training loop around the init/update solver."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from ._alm import ALMInfo, ALMSolver, ALMState, alm
from ._models import to_chain
from ._checks import check_int, check_positive, check_xy

_DEFAULT_MAX_STEPS = 100


class History(NamedTuple):
    """Per-iteration record of a `fit` run (NumPy arrays, one entry per update)."""

    time: np.ndarray  # seconds since `fit` started (compilation included)
    objective: np.ndarray  # L_σ
    loss: np.ndarray  # mean training loss of the forward pass
    mse: np.ndarray  # training MSE of the forward pass's predictions
    h_norm: np.ndarray  # ‖h‖₂
    beta: np.ndarray
    damping: np.ndarray
    grad_norm: np.ndarray
    accepted: np.ndarray
    outer_step: np.ndarray


class FitResult(NamedTuple):
    """What `fit` returns; unpacks as `model, history, state = fit(...)`."""

    model: Any
    history: History
    state: ALMState


def fit(
    model,
    x,
    y,
    *,
    solver: ALMSolver | None = None,
    max_steps: int | None = None,
    time_budget: float | None = None,
    progress: bool = True,
    callback: Callable[[int, ALMState, ALMInfo], Any] | None = None,
    **solver_options,
) -> FitResult:
    """Train `model` on (x, y) by the augmented Lagrangian method.

    Runs `solver.update` (jitted) until the solver converges, `max_steps`
    updates are done, or the `time_budget` (seconds of wall-clock from the
    call, compilation included) would be exceeded by the next update. If
    neither budget is given, at most 100 updates are run.

    Args:
        model: an `eqx.nn.MLP`, an `eqx.nn.Sequential`, or a list of
            equinox modules and `(apply_fn, params)` pairs (a general layer
            chain; returned as an `eqx.nn.Sequential`).
        x, y: training data, (m, n_in) and (m, n_out).
        solver: an `alm(...)` solver; by default `alm(**solver_options)`.
        max_steps: cap on updates (LM iterations).
        time_budget: seconds of wall-clock, compilation included.
        progress: show a progress bar with the MSE, ‖h‖ and β.
        callback: called as `callback(step, state, info)` after each update.
        **solver_options: passed to `alm` when `solver` is None (e.g.
            `policy="alpaqa"`, `max_inner_steps=20`,
            `loss="softmax_cross_entropy"`).

    Returns:
        `FitResult(model, history, state)`.
    """
    start = time.perf_counter()
    if solver is None:
        solver = alm(**solver_options)
    elif solver_options:
        raise TypeError(f"fit: pass either solver or solver options, not both ({sorted(solver_options)}).")
    max_steps = check_int("max_steps", max_steps, minimum=0, allow_none=True)
    if time_budget is not None:
        check_positive("time_budget", time_budget)
    if max_steps is None and time_budget is None:
        max_steps = _DEFAULT_MAX_STEPS
    _, spec = to_chain(model, x)
    x, y = check_xy(spec, x, y)

    state = solver.init(model, x, y)
    update = jax.jit(solver.update).lower(state, x, y).compile()
    records: list[ALMInfo] = []
    times: list[float] = []
    bar = _progress_bar(max_steps, time_budget) if progress else None
    durations: list[float] = []
    try:
        while max_steps is None or len(records) < max_steps:
            now = time.perf_counter()
            if time_budget is not None:
                # Stop before an update that would overrun: its expected cost
                # (recent median, with a margin) plus the time to return.
                estimate = 1.25 * float(np.median(durations[-5:])) + 0.02 if durations else 0.0
                if now - start + estimate > time_budget:
                    break
            state, info = update(state, x, y)
            info = jax.device_get(info)
            t = time.perf_counter()
            durations.append(t - now)
            records.append(info)
            times.append(t - start)
            if bar is not None:
                shown = {"mse": info.mse} if state.spec.loss.name == "squared" else {"loss": info.loss}
                bar.set_postfix({k: f"{v:.3e}" for k, v in shown.items()}, h=f"{info.h_norm:.2e}",
                                beta=f"{info.beta:.1e}", refresh=False)
                if max_steps is not None:
                    bar.update(1)
                else:
                    bar.update(min(t - start, time_budget) - bar.n)
            if callback is not None:
                callback(len(records), state, info)
            if bool(info.converged):
                break
    finally:
        if bar is not None:
            bar.close()
    return FitResult(state.model, _history(records, times), state)


def _history(records, times) -> History:
    fields = {f: np.asarray([getattr(r, f) for r in records]) for f in ALMInfo._fields}
    return History(
        time=np.asarray(times),
        **{k: fields[k] for k in History._fields if k != "time"},
    )


def _progress_bar(max_steps, time_budget):
    from tqdm.auto import tqdm

    if max_steps is not None:
        return tqdm(total=max_steps, desc="alm", unit="step", file=sys.stderr, mininterval=0.5)
    return tqdm(total=time_budget, desc="alm", unit="s", file=sys.stderr, mininterval=0.5,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]")
