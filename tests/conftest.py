import os

# Single-threaded XLA:CPU unless the caller says otherwise: on a busy 2-core
# machine its threaded linear algebra can slow down 10-100x (DESIGN.md §4.6).
# Must be set before the first computation initialises the CPU backend.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
# `pytest -n auto` runs one process per core; on a GPU each would otherwise
# reserve most of its memory up front and the second could not start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import pytest

# Tests run in float64 with strict dtype promotion, as optimistix/lineax do:
# accidental mixed-precision arithmetic in the library fails loudly here.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def cpu_auto(monkeypatch):
    """The "auto" options' CPU rules wherever the tests run: on an accelerator
    they take every sample in the model's dtype (`_lm.on_accelerator`)."""
    from alm_jax._inner import _lm

    monkeypatch.setattr(_lm, "on_accelerator", lambda: False)
