"""One entry point per step kind, whatever the model: the dense chain of an
`eqx.nn.MLP` (Kronecker-structured, `_schur`/`_matfree`) or a general layer
chain (`_generic`)."""

from __future__ import annotations

from .._layers import LayerSpec
from . import _generic, _matfree, _schur


def structured_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, chunk=None):
    """Exact structured LM step: `(dparams, dZ)`."""
    impl = _generic.structured_step if isinstance(spec, LayerSpec) else _schur.structured_step
    return impl(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, chunk)


def matfree_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol=None, max_steps=100, precondition=False,
                 forcing_max=_matfree.FORCING_MAX):
    """CG on the reduced weight system: `(dparams, dZ, cg_steps)`.

    CG's tolerance is `rtol`, or if None the forcing term min(forcing_max, √‖∇f‖)
    of the residual's gradient (computed from the linearisation).

    `precondition=None` takes the Kronecker preconditioner where the model has
    its factors (an MLP's dense chain) and none for a general layer chain.
    """
    if precondition is None:
        precondition = not isinstance(spec, LayerSpec)
    if isinstance(spec, LayerSpec):
        if precondition:
            raise ValueError("precondition: the Kronecker preconditioner needs an eqx.nn.MLP model.")
        return _generic.matfree_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol, max_steps=max_steps,
                                     forcing_max=forcing_max)
    return _matfree.matfree_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol, max_steps=max_steps,
                                 precondition=precondition, forcing_max=forcing_max)
