"""Training losses and their generalised Gauss–Newton factors.

A convex per-sample loss ℓ(o, y) of the network output o enters the lifted
least-squares problem through a factor of its Hessian: with

    Lᵀ L = ∇²ℓ(o),      Lᵀ r = ∇ℓ(o),

the quadratic ½‖r + L δo‖² equals ℓ's second-order model up to a constant,
so the structured Levenberg–Marquardt step of the lifted problem becomes the
generalised Gauss–Newton step (Schraudolph 2002; Martens 2020, §6). `residual`
returns r with a custom JVP that is L δo, so every Jacobian taken of the
lifted residual (structured, matrix-free or the dense reference) is the GGN
Jacobian; the objective that steps are accepted on is the loss itself.

For the squared loss ½‖o − y‖², L = I and r = o − y: plain least squares.
For softmax cross-entropy −Σ y log softmax(o) with p = softmax(o),
∇²ℓ = diag(p) − ppᵀ and a closed-form factor is

    L = diag(√p)(I − 1pᵀ),   r = √p − y/√p    (Σ y = 1),

since LᵀL = diag(p) − ppᵀ when Σp = 1, and Lᵀr = p − y.

References:
    N. N. Schraudolph, "Fast curvature matrix-vector products for
    second-order gradient descent", Neural Computation 14 (2002);
    J. Martens, "New insights and perspectives on the natural gradient
    method", JMLR 21 (2020).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-sample convex loss with its GGN factor (hashable: it is jit-static).

    Attributes:
        name: identifies the loss in errors and reports.
        value: (o, y) → per-sample losses, shape (m,).
        factor: (o, y) → (r, L) with r (m, ny) and L (m, ny, ny),
            Lᵀ L = ∇²ℓ and Lᵀ r = ∇ℓ per sample.
        predict: o → the prediction compared with y (identity, or softmax).
        check_targets: validates concrete targets y (m, ny); raises ValueError.
    """

    name: str
    value: Callable
    factor: Callable
    predict: Callable
    check_targets: Callable

    def residual(self, o, y):
        """r, whose JVP is L δo (the GGN linearisation); shape like `o`."""
        return _ggn_residual(self, o, y)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _ggn_residual_impl(loss, o, y):
    return loss.factor(o, y)[0]


@_ggn_residual_impl.defjvp
def _ggn_residual_jvp(loss, primals, tangents):
    o, y = primals
    do, _ = tangents
    r, L = loss.factor(o, y)
    return r, jnp.einsum("...ab,...b->...a", L, do)


def _ggn_residual(loss: Loss, o, y):
    if loss is SQUARED:
        return o - y  # L = I: the native derivative is already the factor
    return _ggn_residual_impl(loss, o, y)


def _no_check(y):
    return None


def _squared_value(o, y):
    d = o - y
    return 0.5 * jnp.sum(d * d, axis=-1)


def _squared_factor(o, y):
    eye = jnp.broadcast_to(jnp.eye(o.shape[-1], dtype=o.dtype), o.shape[:-1] + (o.shape[-1],) * 2)
    return o - y, eye


def squared() -> Loss:
    """ℓ(o, y) = ½‖o − y‖² (least squares; L = I)."""
    return SQUARED


SQUARED = Loss("squared", _squared_value, _squared_factor, lambda o: o, _no_check)


def _ce_value(o, y):
    return -jnp.sum(y * jax.nn.log_softmax(o, axis=-1), axis=-1)


def _ce_factor(o, y):
    logp = jax.nn.log_softmax(o, axis=-1)
    # Clamped so that 1/√p stays finite in the working precision; the
    # clamp only bites at probabilities below the smallest normal number.
    logp = jnp.maximum(logp, jnp.log(jnp.finfo(o.dtype).tiny))
    sq = jnp.exp(0.5 * logp)
    p = sq * sq
    r = sq - y * jnp.exp(-0.5 * logp)
    eye = jnp.eye(o.shape[-1], dtype=o.dtype)
    L = sq[..., :, None] * (eye - p[..., None, :])
    return r, L


def _ce_check(y):
    y = np.asarray(y)
    if y.shape[-1] < 2:
        raise ValueError(f"y: softmax cross-entropy needs at least 2 classes (one-hot columns), got shape {y.shape}.")
    if np.any(y < 0) or not np.allclose(y.sum(-1), 1, atol=1e-5):
        raise ValueError(
            "y: softmax cross-entropy needs one-hot (or probability) rows, nonnegative and summing to 1; "
            "convert integer labels with jax.nn.one_hot(labels, num_classes)."
        )


def softmax_cross_entropy() -> Loss:
    """ℓ(o, y) = −Σ_k y_k log softmax(o)_k, for one-hot or probability targets y.

    The model's outputs are logits (use `final_activation=lambda s: s`);
    predictions are softmax(o). GGN factor L = diag(√p)(I − 1pᵀ).
    """
    return SOFTMAX_CROSS_ENTROPY


SOFTMAX_CROSS_ENTROPY = Loss("softmax_cross_entropy", _ce_value, _ce_factor,
                             lambda o: jax.nn.softmax(o, axis=-1), _ce_check)

_LOSSES = {"squared": SQUARED, "softmax_cross_entropy": SOFTMAX_CROSS_ENTROPY}


def get_loss(loss) -> Loss:
    """A `Loss` from a name ("squared", "softmax_cross_entropy") or a `Loss`."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in _LOSSES:
        return _LOSSES[loss]
    raise ValueError(f"loss: unknown loss {loss!r}; choose one of {sorted(_LOSSES)} or pass an alm_jax.losses.Loss.")
