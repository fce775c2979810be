"""Time the exact structured (lifted) LM step against a single-shooting GN step.

Both solve a damped Gauss–Newton system for the same MLP and data:

* lifted: `alm_jax` structured step over weights and all hidden states
  (per-sample elimination + Kronecker assembly + Cholesky);
* single shooting: per-sample weight gradients by `vmap(grad)` (the fastest
  way to materialise the m × P Jacobian for one output), JᵀJ + μI, Cholesky.

Each is jitted, warmed up, and timed as the median of `--repeats` runs in the
same process, one after the other. Prints a table and writes JSON.

    python benchmarks/step_cost.py                     # m = 1k..16k, depth 1..4
    python benchmarks/step_cost.py --quick             # small sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from alm_jax._chain import mlp_to_chain  # noqa: E402
from alm_jax._lifted import forward_states_stacked  # noqa: E402
from alm_jax._linalg import num_weights, structured_step  # noqa: E402


def median_time(fn, *args, repeats):
    """Median wall-clock of `fn(*args)` over `repeats` runs after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def single_shooting_step(model):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)

    def out(v, xi):
        return eqx.combine(unravel(v), static)(xi)[0]

    @jax.jit
    def step(flat, x, y, mu):
        jac = jax.vmap(jax.grad(out), in_axes=(None, 0))(flat, x)
        r = jax.vmap(out, in_axes=(None, 0))(flat, x) - y[:, 0]
        s = jac.T @ jac + mu * jnp.eye(flat.size, dtype=flat.dtype)
        return -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(s, lower=True), jac.T @ r)

    return step, flat


def lifted_step(spec, dtype):
    """The jitted structured step, μ_θ = 1e-3, μ_z = 1e-9, β = 10."""
    mu = jnp.asarray(1e-3, dtype)
    return jax.jit(lambda p, z, lam, x, y: structured_step(p, spec, x, y, z, lam, jnp.asarray(10.0, dtype),
                                                           mu, 1e-6 * mu))


def write_results(path, meta, rows):
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"# wrote {out}")


def bench(depth, width, m, n_in, repeats, dtype):
    key = jax.random.split(jax.random.key(depth * 1000 + m), 3)
    model = eqx.nn.MLP(n_in, 1, width, depth, activation=jnp.tanh, dtype=dtype, key=key[0])
    x = jax.random.normal(key[1], (m, n_in), dtype)
    y = jax.random.normal(key[2], (m, 1), dtype)
    params, spec = mlp_to_chain(model)
    Z = forward_states_stacked(params, spec, x)
    lam = jnp.zeros_like(Z)
    mu = jnp.asarray(1e-3, dtype)
    lifted = lifted_step(spec, dtype)
    t_lifted = median_time(lifted, params, Z, lam, x, y, repeats=repeats)
    ss, flat = single_shooting_step(model)
    t_ss = median_time(ss, flat, x, y, mu, repeats=repeats)
    return {"depth": depth, "width": width, "m": m, "n_in": n_in, "P": num_weights(spec),
            "lifted_s": t_lifted, "single_shooting_s": t_ss, "ratio": t_lifted / t_ss}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--m", type=int, nargs="*", default=None)
    ap.add_argument("--depth", type=int, nargs="*", default=None)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--n-in", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--out", default="benchmarks/out/step_cost.json")
    args = ap.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    ms = args.m or ([250, 500, 1000] if args.quick else [1000, 2000, 4000, 8000, 16000])
    depths = args.depth or ([1, 2] if args.quick else [1, 2, 3, 4])
    width = 8 if args.quick and args.width == 32 else args.width

    meta = {"device": str(jax.devices()[0]), "platform": platform.platform(), "python": sys.version.split()[0],
            "jax": jax.__version__, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "dtype": args.dtype,
            "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(f"# step cost: lifted structured LM vs single-shooting GN ({args.dtype}, width {width}, "
          f"n_in {args.n_in}, n_out 1, median of {args.repeats})")
    print(f"# device {meta['device']}, XLA_FLAGS={meta['XLA_FLAGS']!r}")
    print(f"{'depth':>5} {'m':>7} {'P':>6} {'lifted s':>10} {'single s':>10} {'ratio':>6} {'lifted us/sample':>17}")
    rows = []
    for depth in depths:
        for m in ms:
            r = bench(depth, width, m, args.n_in, args.repeats, dtype)
            rows.append(r)
            print(f"{depth:5d} {m:7d} {r['P']:6d} {r['lifted_s']:10.4f} {r['single_shooting_s']:10.4f} "
                  f"{r['ratio']:6.2f} {1e6 * r['lifted_s'] / m:17.1f}", flush=True)
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
