"""Peak memory of the explicit structured step: bounded in m beyond the states.

Measured on the compiled step (XLA's memory analysis, which XLA:CPU provides)
so that no device memory statistics are needed.
"""

import jax.numpy as jnp
import pytest

from alm_jax._chain import mlp_to_chain
from alm_jax._linalg._schur import structured_step

from _problems import make_problem


def _temp_bytes(m, depth, width, chunk):
    pb = make_problem(depth=depth, width=width, n_in=3, n_out=1, m=m, seed=0)
    params, spec = mlp_to_chain(pb.model)
    Z, Lam = jnp.stack(pb.states), jnp.stack(pb.multipliers)
    one = jnp.asarray(1.0)
    compiled = structured_step.lower(params, spec, pb.x, pb.y, Z, Lam, one, one, one, chunk).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend gives no memory analysis")
    return analysis.temp_size_in_bytes


@pytest.mark.parametrize("depth", [pytest.param(1, marks=pytest.mark.slow), 3])  # 3 also sweeps
def test_explicit_step_memory_grows_only_like_the_states(depth):
    """With a fixed chunk, the step's scratch memory per extra sample is a few
    state-sized vectors (N·n floats each), far below the N·n² of per-sample
    factors or the (N·n)² of per-sample projector blocks."""
    width, chunk = 32, 128
    small, large = 512, 2048
    per_sample = (_temp_bytes(large, depth, width, chunk) - _temp_bytes(small, depth, width, chunk)) / (large - small)
    state_bytes = depth * width * 8
    assert per_sample <= 12 * state_bytes, per_sample / state_bytes
