"""The Gauss–Newton model of a step at the current point, from the linearisation.

An LM iteration needs, besides the step d, the objective and its gradient's
norm at the current point, the model's predicted decrease and (for the
rolled-out trial states) the constraint values the model predicts:

    f    = Σℓ/β + ½‖r_h‖²                      (`_lifted.merit`)
    ‖∇f‖ = ‖Jᵀr‖
    pred = ½‖r‖² − ½‖r + J d‖² = −rᵀJ d − ½‖J d‖²
    h + J_h d = (r_h + (J d)_h)/ω − λ/σ         (r_h = ω ⊙ (h + λ/σ))

and, for a shortened trial αd, the slope rᵀJ d and h. All follow from the
linearisation the step was built from with a few GEMMs (and the matrix-free
step's forcing term already takes ‖∇f‖ from it).
By automatic differentiation instead (a forward pass for f, forward-mode
passes of the residual and of the constraints, and a reverse pass for the
outer loop's stopping test) they had been 23 of the 200 fused kernels
XLA:CPU compiled for one `update` of a 1×50 network, and 17 of 368 at
4×16; compiling is most of the time an update takes to its first result
(benchmarks/RESULTS.md, Round 7).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax

from .._lifted import penalty_split
from . import _curvature
from ._linearise import Linearisation
from ._matfree import apply_ju, residual_gradient
from ._schur import weight_jvp


class StepModel(NamedTuple):
    objective: jnp.ndarray  # f at the current point
    gradient_norm: jnp.ndarray  # ‖∇f‖ there
    predicted: jnp.ndarray  # the model's decrease of f along d
    defects: jnp.ndarray  # h + J_h d, shaped like the states
    slope: jnp.ndarray  # rᵀJ d, the directional derivative of f along d
    constraints: jnp.ndarray  # h at the current point, shaped like the states
    second_order: jnp.ndarray | None = None  # ½dᵀC d (`_curvature`), where asked for


def step_model(lin: Linearisation, spec, Lam, sigma, dparams, dZ, q=None) -> StepModel:
    """The model at the current point; with `q` (`_curvature`) also ½dᵀC d."""
    beta = penalty_split(sigma)[0]
    wh, wo = weight_jvp(lin, dparams, spec)
    uh, uo = apply_ju(lin, dZ)
    jd_h, jd_o = wh + uh, wo + uo
    objective = jnp.sum(lin.loss) / beta + 0.5 * jnp.sum(lin.r_h * lin.r_h)
    slope = jnp.sum(lin.r_h * jd_h) + jnp.sum(lin.r_o * jd_o)
    predicted = -slope - 0.5 * (jnp.sum(jd_h * jd_h) + jnp.sum(jd_o * jd_o))
    second_order = None if q is None else _curvature.quadratic(q, lin, dparams)
    gradient_norm = optax.tree_utils.tree_norm(residual_gradient(lin))
    offset = Lam / sigma
    return StepModel(objective, gradient_norm, predicted, (lin.r_h + jd_h) / lin.omega - offset, slope,
                     lin.r_h / lin.omega - offset, second_order)
