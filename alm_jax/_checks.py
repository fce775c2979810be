"""Input validation with clear, early errors (before any compilation)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from ._chain import ChainSpec
from ._layers import LayerSpec


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _as_float_array(name: str, a, dtype):
    if a is None:
        raise TypeError(f"{name}: expected an array, got None.")
    if not hasattr(a, "dtype"):
        try:
            a = np.asarray(a)
        except Exception as err:  # pragma: no cover - exotic input
            raise TypeError(f"{name}: could not convert {type(a).__name__} to an array.") from err
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(
            f"{name}: expected floating-point data, got dtype {a.dtype}; "
            f"convert it, e.g. {name}.astype(jnp.float32)."
        )
    return jnp.asarray(a, dtype=dtype)


def _all_finite(a) -> bool:
    # On the host in NumPy: eagerly, jnp.isfinite and its reduction compiled
    # for every new shape (0.26 s of a 0.6 s `init` on UCI kin8nm). Only
    # data on an accelerator is tested where it lives, not copied back.
    if isinstance(a, jax.Array) and any(d.platform != "cpu" for d in a.devices()):
        return bool(jnp.all(jnp.isfinite(a)))
    return bool(np.isfinite(np.asarray(a)).all())


def _check_finite(name: str, a):
    if _is_concrete(a) and not _all_finite(a):
        raise ValueError(f"{name}: contains NaN or infinite values.")


def check_xy(spec: ChainSpec, x, y=None):
    """Validate and reshape data to (m, n_in) and (m, n_out) in the model's dtype."""
    x = _as_float_array("x", x, spec.dtype)
    want_x = 1 if spec.scalar_in else 2
    if spec.scalar_in and x.ndim == 2 and x.shape[1] == 1:
        want_x = 2
    if x.ndim != want_x:
        raise ValueError(
            f"x: expected shape (m, {spec.n_in})" + (" or (m,)" if spec.scalar_in else "")
            + f", got rank-{x.ndim} array of shape {x.shape}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"x: no samples (m = 0), got shape {x.shape}.")
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != spec.n_in:
        raise ValueError(f"x: the model takes {spec.n_in} input features, got x of shape {x.shape}.")
    _check_finite("x", x)
    if y is None:
        return x
    y = _as_float_array("y", y, spec.dtype)
    if y.ndim == 1 and spec.n_out == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"y: expected shape (m, {spec.n_out}), got rank-{y.ndim} array of shape {y.shape}.")
    if y.shape[1] != spec.n_out:
        raise ValueError(f"y: the model has {spec.n_out} outputs, got y of shape {y.shape}.")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y: sample counts differ ({x.shape[0]} vs {y.shape[0]}).")
    _check_finite("y", y)
    if _is_concrete(y):
        spec.loss.check_targets(y)
    return x, y


def check_states(name: str, spec, states, m: int):
    """Validate a tuple of N arrays of shape (m, width_a) and stack them to the internal layout
    ((N, m, width) for an MLP, (1, m, Σ width_a) for a layer chain)."""
    widths = spec.widths if isinstance(spec, LayerSpec) else (spec.width,) * spec.depth
    if not isinstance(states, (tuple, list)):
        raise TypeError(f"{name}: expected a tuple of {spec.depth} arrays of shapes (m, width) with widths {widths}.")
    if len(states) != spec.depth:
        raise ValueError(f"{name}: expected {spec.depth} arrays (one per hidden state), got {len(states)}.")
    out = []
    for i, (s, n) in enumerate(zip(states, widths)):
        s = _as_float_array(f"{name}[{i}]", s, spec.dtype)
        if s.shape != (m, n):
            raise ValueError(f"{name}[{i}]: expected shape {(m, n)}, got {s.shape}.")
        _check_finite(f"{name}[{i}]", s)
        out.append(s)
    if isinstance(spec, LayerSpec):
        return jnp.concatenate(out, axis=-1)[None]
    return jnp.stack(out)


def check_positive(name: str, value, *, allow_zero: bool = False, below: float | None = None,
                   at_most: float | None = None):
    """A real scalar option that must be > 0 (or >= 0), and < `below` or <= `at_most` if given; tracers pass
    through."""
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}.")
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {arr.shape}.")
    v = float(arr)
    ok = (v >= 0 if allow_zero else v > 0) and np.isfinite(v)
    bound = ">= 0" if allow_zero else "> 0"
    if below is not None:
        ok, bound = ok and v < below, f"{bound} and < {below:g}"
    if at_most is not None:
        ok, bound = ok and v <= at_most, f"{bound} and <= {at_most:g}"
    if not ok:
        raise ValueError(f"{name}: must be finite and {bound}, got {v}.")
    return value


def check_int(name: str, value, *, minimum: int = 1, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}.")
    return int(value)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: unknown value {value!r}; choose one of {sorted(choices)}.")
    return value


def check_solve_dtype(value, allow_auto: bool = False):
    """None, or float32/float64 given as a dtype or its name (or "auto" if allowed); returned as the name."""
    if value is None or (allow_auto and isinstance(value, str) and value == "auto"):
        return value
    try:
        name = np.dtype(value).name
    except TypeError:
        name = None
    if name not in ("float32", "float64"):
        expected = "None, 'auto', float32 or float64" if allow_auto else "None, float32 or float64"
        raise ValueError(f"solve_dtype: expected {expected}, got {value!r}.")
    return name
