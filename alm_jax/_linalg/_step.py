"""One entry point per step kind, whatever the model: the dense chain of an
`eqx.nn.MLP` (Kronecker-structured, `_schur`/`_matfree`) or a general layer
chain (`_generic`)."""

from __future__ import annotations

import jax.numpy as jnp

from .._checks import check_solve_dtype
from .._layers import LayerSpec
from . import _curvature, _generic, _matfree, _schur


def structured_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, chunk=None):
    """Exact structured LM step: `(dparams, dZ)`."""
    impl = _generic.structured_step if isinstance(spec, LayerSpec) else _schur.structured_step
    return impl(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, chunk)


def matfree_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol=None, max_steps=100, precondition=False,
                 forcing_max=_matfree.FORCING_MAX, solve_dtype=None, curvature_weight=None, cap=None, stride=1, offset=0):
    """CG on the reduced weight system: `(dparams, dZ, cg_steps)`.

    CG's tolerance is `rtol`, or if None the forcing term min(forcing_max, √‖∇f‖)
    of the residual's gradient (computed from the linearisation).

    `precondition=None` takes the Kronecker preconditioner where the model has
    its factors (an MLP's dense chain) and none for a general layer chain.
    `solve_dtype` runs CG in another dtype than the model's (an MLP's dense
    chain only; None: the model's). `curvature_weight` τ (None: Gauss–Newton)
    adds τ times the stage rows' second-order term (`_curvature`; an MLP
    with one hidden layer). `stride` k > 1 builds CG's products from every
    k-th sample from `offset` (an MLP's dense chain; `_matfree.matfree_step`).
    """
    if precondition is None:
        precondition = not isinstance(spec, LayerSpec)
    solve_dtype = check_solve_dtype(solve_dtype)
    if solve_dtype == jnp.dtype(spec.dtype).name:
        solve_dtype = None  # the model's own: the same program, compiled once
    if curvature_weight is not None:
        _curvature.check_supported(spec)
    if isinstance(spec, LayerSpec):
        if precondition:
            raise ValueError("precondition: the Kronecker preconditioner needs an eqx.nn.MLP model.")
        if stride > 1:
            raise ValueError("curvature_samples: a subsample for CG's products needs an eqx.nn.MLP model.")
        if solve_dtype is not None:
            raise ValueError(f"solve_dtype={solve_dtype}: a general layer chain's CG runs in the model's dtype "
                             f"({jnp.dtype(spec.dtype).name}); mixed precision needs an eqx.nn.MLP model.")
        return _generic.matfree_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol, max_steps=max_steps,
                                     forcing_max=forcing_max, cap=cap)
    return _matfree.matfree_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol, max_steps=max_steps,
                                 precondition=precondition, forcing_max=forcing_max, solve_dtype=solve_dtype,
                                 curvature_weight=curvature_weight, cap=cap, stride=stride, offset=offset)
