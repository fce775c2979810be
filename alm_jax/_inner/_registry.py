"""Inner solvers by name."""

from __future__ import annotations

from ._base import InnerSolver
from ._bcd import bcd
from ._first_order import adam, lbfgs
from ._gn import gn
from ._lm import cg, lm

INNER_SOLVERS = {"lm": lm, "gn": gn, "cg": cg, "lbfgs": lbfgs, "adam": adam, "bcd": bcd}


def get_inner(inner, **options) -> InnerSolver:
    """An `InnerSolver` from a name (with its options) or an `InnerSolver` itself."""
    if isinstance(inner, InnerSolver):
        if options:
            raise TypeError(f"inner: options {sorted(options)} go to the solver's factory, "
                            f"e.g. alm_jax.inner.{inner.name}(...), not next to a solver object.")
        return inner
    if not isinstance(inner, str):
        raise TypeError(f"inner: expected a name or an InnerSolver, got {type(inner).__name__}.")
    if inner not in INNER_SOLVERS:
        raise ValueError(f"inner: unknown solver {inner!r}; choose one of {sorted(INNER_SOLVERS)}.")
    try:
        return INNER_SOLVERS[inner](**options)
    except TypeError as err:
        raise TypeError(f"inner={inner!r}: {err}") from None
