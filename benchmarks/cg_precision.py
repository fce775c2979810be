"""What one matrix-free step costs with CG in float64 and in float32.

The inner `cg`'s step (`alm_jax._linalg.matfree_step`) on a float64 MLP
at the first ALM iterate: the setup (linearisation, per-sample factors,
preconditioner, right-hand side) and the cost per CG product, from the
times of a step capped at 1 and at `1 + --products` CG steps (rtol 1e-30,
so the cap ends CG), minimum over `--reps` calls of the jitted step.
float32 is `solve_dtype="float32"`, an option of the inner `cg` for an MLP,
not its default (RESULTS.md, Round 8).

    python benchmarks/cg_precision.py
    python benchmarks/cg_precision.py --nets kin8nm:1:50 concrete:4:16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

import alm_jax  # noqa: E402
from alm_jax._linalg import matfree_step  # noqa: E402


def _min_time(f, reps):
    jax.block_until_ready(f())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        best = min(best, time.perf_counter() - t0)
    return best


def measure(dataset, depth, width, products, reps):
    d = alm_jax.datasets.load_uci(dataset, split=0)
    x, y = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    model = eqx.nn.MLP(x.shape[1], 1, width, depth, activation=jnp.tanh, key=jax.random.key(0))
    s = alm_jax.alm().init(model, x, y)
    mu = jnp.asarray(1e-4)
    rows = []
    for solve_dtype in ("float64", "float32"):
        times = []
        for cap in (1, 1 + products):
            step = jax.jit(lambda s, mu, cap=cap, sd=solve_dtype: matfree_step(
                s.params, s.spec, x, y, s.states, s.multipliers, s.policy.sigma, mu, 1e-6 * mu,
                jnp.asarray(1e-30), cap, True, solve_dtype=sd))
            times.append(_min_time(lambda: step(s, mu), reps))
        rows.append(dict(net=f"{dataset}:{depth}:{width}", solve_dtype=solve_dtype, setup_ms=1e3 * times[0],
                         per_product_ms=1e3 * (times[1] - times[0]) / products))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["kin8nm:1:50", "concrete:4:16"], help="dataset:depth:width")
    ap.add_argument("--products", type=int, default=30)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"# XLA_FLAGS={os.environ['XLA_FLAGS']!r}, min of {args.reps} calls")
    print(f"{'network':18s} {'CG dtype':8s} {'setup ms':>9s} {'ms/product':>11s}")
    rows = []
    for net in args.nets:
        name, depth, width = net.split(":")
        for r in measure(name, int(depth), int(width), args.products, args.reps):
            rows.append(r)
            print(f"{r['net']:18s} {r['solve_dtype']:8s} {r['setup_ms']:9.2f} {r['per_product_ms']:11.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
