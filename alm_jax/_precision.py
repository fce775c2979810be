"""The matrix-multiply precision the solvers' arithmetic is traced under.

JAX lets XLA multiply float32 matrices in reduced precision on accelerators
(TF32, a 10-bit mantissa, on NVIDIA GPUs from Ampere on). A Gauss–Newton step
amplifies product errors by the condition number of its system, and the LM
gain ratio compares objectives whose difference can be far below 1e-3 of
their size, so the solvers default to full-precision products.
"""

from __future__ import annotations

import contextlib

import jax

DEFAULT = "highest"


def check_matmul_precision(value):
    """None (JAX's own setting) or a name `jax.default_matmul_precision` accepts."""
    if value is None:
        return None
    try:
        with jax.default_matmul_precision(value):
            pass
    except (ValueError, TypeError):
        raise ValueError(
            "matmul_precision: expected None or a precision name jax.default_matmul_precision accepts "
            f"('highest', 'high', 'default', 'float32', 'tensorfloat32', 'bfloat16', ...), got {value!r}."
        ) from None
    return value


def matmul_precision(value):
    """Context in which the solver's products are traced; None leaves JAX's setting.

    Validates `value` as `check_matmul_precision` does.
    """
    value = check_matmul_precision(value)
    return contextlib.nullcontext() if value is None else jax.default_matmul_precision(value)
