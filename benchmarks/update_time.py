"""Milliseconds per default ALM `update` once compiled, on a few UCI networks.

For comparing machines and XLA flags (on a GPU, `XLA_FLAGS=
--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL`; RESULTS.md, Round 25).
Per network: the first update's seconds from `init` (compilation included),
then 10 warm-up updates, then the mean of `--updates` timed ones and the
train MSE reached. The CPU's thread flags are set unless XLA_FLAGS is.

    python benchmarks/update_time.py
    XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL python benchmarks/update_time.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

import alm_jax  # noqa: E402

NETWORKS = ("kin8nm:1x50", "concrete:1x50", "wine-quality-red:1x50", "concrete:4x16")


def time_updates(dataset: str, depth: int, width: int, split: int, updates: int) -> dict:
    d = alm_jax.datasets.load_uci(dataset, split=split)
    x, y = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    model = eqx.nn.MLP(x.shape[1], y.shape[1], width, depth, activation=jnp.tanh, key=jax.random.key(0))
    solver = alm_jax.alm()
    start = time.perf_counter()
    state = solver.init(model, x, y)
    update = jax.jit(solver.update)
    state, info = update(state, x, y)
    jax.block_until_ready(info.mse)
    first = time.perf_counter() - start
    for _ in range(10):
        state, info = update(state, x, y)
    jax.block_until_ready(info.mse)
    start = time.perf_counter()
    for _ in range(updates):
        state, info = update(state, x, y)
    jax.block_until_ready(info.mse)
    ms = (time.perf_counter() - start) / updates * 1e3
    return {"first_update_s": first, "ms_per_update": ms, "train_mse": float(info.mse), "updates": 11 + updates}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="*", default=list(NETWORKS), help="DATASET:DEPTHxWIDTH")
    ap.add_argument("--split", type=int, default=1)
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/out/update_time.json")
    args = ap.parse_args(argv)
    if args.updates < 1:
        ap.error("--updates must be at least 1")
    result = {"XLA_FLAGS": os.environ["XLA_FLAGS"], "device": str(jax.devices()[0]), "split": args.split, "rows": {}}
    print(f"# {result['device']}, XLA_FLAGS={result['XLA_FLAGS']!r}, split {args.split}")
    print(f"{'network':28s} {'first update':>12s} {'ms/update':>10s} {'train MSE':>10s}")
    for net in args.networks:
        dataset, _, arch = net.partition(":")
        depth, width = (int(v) for v in (arch or "1x50").split("x"))
        row = time_updates(dataset, depth, width, args.split, args.updates)
        result["rows"][f"{dataset} {depth}x{width}"] = row
        print(f"{dataset + ' ' + str(depth) + 'x' + str(width):28s} {row['first_update_s']:10.2f} s "
              f"{row['ms_per_update']:10.2f} {row['train_mse']:10.4g}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
