"""Model-level functions of the lifted problem (the public verification contract).

These accept a model (an `eqx.nn.MLP`, or a general layer chain: an
`eqx.nn.Sequential` or a list of modules and `(apply_fn, params)` pairs), data
`x` (m, n_in), `y` (m, n_out), and states and multipliers as tuples of
(m, width) arrays, one per hidden state.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _lifted, _precision
from ._models import to_chain, to_filtered, unstack_states
from ._checks import check_positive, check_states, check_xy
from ._linalg import structured_step
from ._losses import get_loss


def forward_states(model, x: Float[Array, "m nx"]) -> tuple[Float[Array, "m n"], ...]:
    """Hidden states z_1..z_N of the forward pass, one (m, width) array per hidden layer."""
    params, spec = to_chain(model, x)
    x = check_xy(spec, x)
    return unstack_states(spec, _lifted.forward_states_stacked(params, spec, x))


def constraints(model, states, x) -> tuple[Float[Array, "m n"], ...]:
    """Constraint residuals h_a = z_{a+1} − φ(W_a z_a + b_a), one array per hidden layer."""
    params, spec = to_chain(model, x)
    x = check_xy(spec, x)
    Z = check_states("states", spec, states, x.shape[0])
    return unstack_states(spec, _lifted.constraints_stacked(params, spec, x, Z))


def _prepare(model, states, multipliers, x, y, beta, loss):
    params, spec = to_chain(model, x)
    spec = dataclasses.replace(spec, loss=get_loss(loss))
    x, y = check_xy(spec, x, y)
    Z = check_states("states", spec, states, x.shape[0])
    Lam = check_states("multipliers", spec, multipliers, x.shape[0])
    check_positive("beta", beta)
    beta = jnp.asarray(beta, spec.dtype)
    return params, spec, x, y, Z, Lam, beta


def residual(model, states, multipliers, x, y, beta, *, loss="squared") -> Float[Array, " rows"]:
    """The least-squares residual F_β = [F/√β ; h + λ/β] as one 1-D array.

    Rows are ordered: the output residual F = ŷ − y (sample-major), then the
    constraints h + λ/β layer by layer (sample-major within a layer). For a
    non-squared `loss`, F is its Gauss–Newton residual r (`alm_jax.losses`),
    whose JVP is the GGN factor L times the output's.
    """
    params, spec, x, y, Z, Lam, beta = _prepare(model, states, multipliers, x, y, beta, loss)
    return _lifted.lifted_residual(params, Z, spec, x, y, Lam, beta)


def augmented_lagrangian(model, states, multipliers, x, y, beta, *, loss="squared") -> Float[Array, ""]:
    """L_β = Σℓ(ŷ, y) + ⟨λ, h⟩ + (β/2)‖h‖²  (Σℓ = ½‖F‖² for the squared loss)."""
    params, spec, x, y, Z, Lam, beta = _prepare(model, states, multipliers, x, y, beta, loss)
    return _lifted.augmented_lagrangian_stacked(params, Z, spec, x, y, Lam, beta)


def augmented_lagrangian_grad(model, states, multipliers, x, y, beta, *, loss="squared"):
    """∇L_β with respect to the weights and the states: `(dmodel, dstates)`.

    `dmodel` is shaped like `eqx.filter(model, eqx.is_inexact_array)`.
    """
    import jax

    params, spec, x, y, Z, Lam, beta = _prepare(model, states, multipliers, x, y, beta, loss)
    gp, gz = jax.grad(_lifted.augmented_lagrangian_stacked, argnums=(0, 1))(params, Z, spec, x, y, Lam, beta)
    return to_filtered(gp, spec), unstack_states(spec, gz)


def lm_step(model, states, multipliers, x, y, beta, damping, *, state_damping=None, chunk_size=None,
            loss="squared", matmul_precision=_precision.DEFAULT):
    """Exact Levenberg–Marquardt step of the lifted least-squares problem.

    Returns the minimiser `d = (dmodel, dstates)` of

        ‖J d + F_β‖² + damping·‖dθ‖² + state_damping·‖dZ‖²

    where J is the Jacobian of `residual` with respect to the weights θ and
    the states Z (`state_damping` defaults to `damping`). The states are
    eliminated per sample by a block-tridiagonal sweep over the layers and
    the weights' reduced system is assembled with the Kronecker structure of
    dense layers and solved by Cholesky (see `alm_jax._linalg._schur`).

    Args:
        model: an `eqx.nn.MLP`.
        states, multipliers: tuples of (m, width) arrays, one per hidden layer.
        x, y: data, (m, n_in) and (m, n_out).
        beta: penalty β > 0.
        damping: weight damping μ_θ ≥ 0.
        state_damping: state damping μ_z ≥ 0 (default: `damping`).
        chunk_size: samples per assembly chunk (default: chosen from the sizes).
        loss: "squared" or "softmax_cross_entropy" (the GGN step), or a `Loss`.
        matmul_precision: precision of the matrix products (as in `alm`):
            "highest" by default, None for JAX's own setting.

    Returns:
        `(dmodel, dstates)`: `dmodel` shaped like
        `eqx.filter(model, eqx.is_inexact_array)`, `dstates` like `states`.
    """
    params, spec, x, y, Z, Lam, beta = _prepare(model, states, multipliers, x, y, beta, loss)
    check_positive("damping", damping, allow_zero=True)
    if state_damping is None:
        state_damping = damping
    check_positive("state_damping", state_damping, allow_zero=True)
    with _precision.matmul_precision(matmul_precision):
        dparams, dZ = structured_step(
            params, spec, x, y, Z, Lam, beta,
            jnp.asarray(damping, spec.dtype), jnp.asarray(state_damping, spec.dtype), chunk_size,
        )
    return to_filtered(dparams, spec), unstack_states(spec, dZ)


def dense_lm_step(model, states, multipliers, x, y, beta, damping, *, state_damping=None, loss="squared",
                  matmul_precision=_precision.DEFAULT):
    """Reference for `lm_step` by a dense `lstsq` of the full lifted Jacobian (tiny problems only)."""
    from ._linalg import dense_step

    params, spec, x, y, Z, Lam, beta = _prepare(model, states, multipliers, x, y, beta, loss)
    if state_damping is None:
        state_damping = damping
    with _precision.matmul_precision(matmul_precision):
        dparams, dZ = dense_step(params, spec, x, y, Z, Lam, beta, damping, state_damping)
    return to_filtered(dparams, spec), unstack_states(spec, dZ)


def apply_updates(model, dmodel):
    """model + dmodel for a `dmodel` shaped like the filtered model."""
    return eqx.apply_updates(model, dmodel)
