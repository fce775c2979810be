"""Scaling of the structured step on one device (GPU or CPU): time, flops, rate, memory.

For m samples and MLPs of N hidden layers of width n it times, each jitted and
warmed up (median of `--repeats`):

* the exact structured LM step (`alm_jax` lifted step over weights and states),
  where its P × P reduced system fits in memory;
* the matrix-free step (CG on the reduced system, relative tolerance 1e-2,
  at most 50 products: the `cg` inner solver's linear algebra), for every size;
* a single-shooting Gauss–Newton step (per-sample gradients by vmap(grad),
  JᵀJ + μI, Cholesky), where its m × P Jacobian fits in memory;
* one full-batch Adam epoch (gradient + update).

It reports the flops the structured step must do — the assembly ≈ 2·m·P²,
Cholesky P³/3 — and the fraction of the device's matrix-multiply rate,
measured at the start with a large square GEMM in the same dtype, that the
assembly alone would reach in the step's time. Peak device memory is read from
`device.memory_stats()` where the backend provides it (GPUs do, XLA:CPU does
not), and is the process's peak so far.

    python benchmarks/scale.py --quick               # small sizes, any machine
    python benchmarks/scale.py                       # m = 1e4 … 1e6, 1×50 … 3×256
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from alm_jax._chain import mlp_to_chain  # noqa: E402
from alm_jax._lifted import forward_states_stacked  # noqa: E402
from alm_jax._linalg import matfree_step, num_weights  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_cost import lifted_step, median_time, single_shooting_step, write_results  # noqa: E402


def matmul_rate(dtype, size, repeats=3):
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    t = median_time(f, a, repeats=repeats)
    return 2 * size**3 / t


def peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def memory_limit():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 8 * 2**30)


def adam_epoch(model, x, y):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = optax.adam(1e-3)

    @jax.jit
    def epoch(p, s):
        def loss(p):
            return 0.5 * jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)

        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    return epoch, params, opt.init(params)


def matfree(spec, dtype):
    """The jitted matrix-free step with the same damping and penalty as `lifted_step`."""
    mu = jnp.asarray(1e-3, dtype)
    return jax.jit(lambda p, z, lam, x, y: matfree_step(p, spec, x, y, z, lam, jnp.asarray(10.0, dtype), mu,
                                                        1e-6 * mu, jnp.asarray(1e-2, dtype), max_steps=50))


def run_config(depth, width, m, n_in, dtype, repeats, limit):
    keys = jax.random.split(jax.random.key(m + depth * 7 + width), 3)
    model = eqx.nn.MLP(n_in, 1, width, depth, activation=jnp.tanh, dtype=dtype, key=keys[0])
    x = jax.random.normal(keys[1], (m, n_in), dtype)
    y = jax.random.normal(keys[2], (m, 1), dtype)
    params, spec = mlp_to_chain(model)
    P = num_weights(spec)
    item = jnp.dtype(dtype).itemsize
    row = {"depth": depth, "width": width, "m": m, "P": P, "dtype": jnp.dtype(dtype).name}
    Z = forward_states_stacked(params, spec, x)
    lam = jnp.zeros_like(Z)
    mu = jnp.asarray(1e-3, dtype)
    mf = matfree(spec, dtype)
    row["cg_step_s"] = median_time(mf, params, Z, lam, x, y, repeats=repeats)
    row["cg_products"] = int(mf(params, Z, lam, x, y)[2])
    if 3 * P * P * item > limit:
        row["skipped"] = "reduced system does not fit"
        return row
    t = median_time(lifted_step(spec, dtype), params, Z, lam, x, y, repeats=repeats)
    row.update(lifted_s=t, assembly_flops=2.0 * m * P * P, cholesky_flops=P**3 / 3,
               peak_bytes_after_lifted=peak_bytes())
    if 2 * m * P * item < limit / 2:
        ss, flat = single_shooting_step(model)
        row["single_shooting_s"] = median_time(ss, flat, x, y, mu, repeats=repeats)
    else:
        row["single_shooting_s"] = None
    epoch, p0, s0 = adam_epoch(model, x, y)
    row["adam_epoch_s"] = median_time(epoch, p0, s0, repeats=repeats)
    row["peak_bytes"] = peak_bytes()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--m", type=int, nargs="*")
    ap.add_argument("--arch", nargs="*", help="DEPTHxWIDTH, e.g. 1x50 3x256")
    ap.add_argument("--n-in", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "float64"],
                    help="default: float32 on accelerators, float64 on CPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/out/scale.json")
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    dtype_name = args.dtype or ("float64" if backend == "cpu" else "float32")
    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(dtype_name)
    ms = args.m or ([1000, 2000] if args.quick else [10_000, 30_000, 100_000, 300_000, 1_000_000])
    archs = args.arch or (["1x16", "2x16"] if args.quick else ["1x50", "2x128", "3x256"])
    archs = [tuple(int(v) for v in a.lower().split("x")) for a in archs]
    rate = matmul_rate(dtype, 1024 if (args.quick or backend == "cpu") else 8192)
    limit = memory_limit()
    meta = {"device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind, "backend": backend,
            "platform": platform.platform(), "jax": jax.__version__, "dtype": dtype_name,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "matmul_flops_per_s": rate,
            "command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(f"# {meta['device_kind']} ({backend}), {dtype_name}, measured matmul rate {rate / 1e12:.3f} TFLOP/s, "
          f"XLA_FLAGS={meta['XLA_FLAGS']!r}")
    print(f"{'arch':>7} {'m':>8} {'P':>7} {'lifted s':>9} {'GFLOP':>8} {'asm rate':>8} {'GN s':>8} "
          f"{'adam s':>8} {'peak GiB':>8} {'CG s':>8} {'#CG':>4}")
    rows = []
    for depth, width in archs:
        for m in ms:
            try:
                r = run_config(depth, width, m, args.n_in, dtype, args.repeats, limit)
            except Exception as err:  # out of memory and the like: record, go on
                r = {"depth": depth, "width": width, "m": m, "error": f"{type(err).__name__}: {err}"[:300]}
            rows.append(r)
            cg = f"{r['cg_step_s']:8.3f} {r['cg_products']:4d}" if "cg_step_s" in r else ""
            if "lifted_s" not in r:
                print(f"{depth}x{width:<5} {m:8d}  {r.get('skipped') or r.get('error')}  {cg}", flush=True)
                continue
            frac = r["assembly_flops"] / r["lifted_s"] / rate
            gn = f"{r['single_shooting_s']:8.3f}" if r["single_shooting_s"] is not None else f"{'-':>8}"
            peak = f"{r['peak_bytes'] / 2**30:8.2f}" if r.get("peak_bytes") else f"{'n/a':>8}"
            print(f"{depth}x{width:<5} {m:8d} {r['P']:7d} {r['lifted_s']:9.3f} "
                  f"{(r['assembly_flops'] + r['cholesky_flops']) / 1e9:8.1f} {frac:8.1%} {gn} "
                  f"{r['adam_epoch_s']:8.4f} {peak} {cg}", flush=True)
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
