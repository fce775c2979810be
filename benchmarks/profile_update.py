"""Where one ALM `update` spends its time: the XLA kernels, slowest first.

Runs the default solver for `--warmup` updates on a UCI split, then traces
`--updates` more with `jax.profiler` (XLA:CPU kernel events need
`--xla_cpu_enable_xprof_traceme=true`, set here) and prints each kernel's
time per update, how often it ran per update, and the HLO op it came from.
Kernels inside the CG loop run once per CG product. Use it to find a kernel
that runs far slower than its size suggests (Round 5 of RESULTS.md: a
fused per-sample reduction that XLA:CPU recomputed per element).

    python benchmarks/profile_update.py --dataset kin8nm
    python benchmarks/profile_update.py --dataset concrete --depth 4 --width 16
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ["XLA_FLAGS"] += " --xla_cpu_enable_xprof_traceme=true"

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

import alm_jax  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="kin8nm")
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--width", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)

    d = alm_jax.datasets.load_uci(args.dataset, split=args.split)
    x, y = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    model = eqx.nn.MLP(x.shape[1], y.shape[1], args.width, args.depth, activation=jnp.tanh, key=jax.random.key(0))
    solver = alm_jax.alm()
    state = solver.init(model, x, y)
    update = jax.jit(solver.update)
    for _ in range(args.warmup):
        state, _ = update(state, x, y)
    jax.block_until_ready(state.states)
    hlo = update.lower(state, x, y).compile().as_text()

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(args.updates):
            state, _ = update(state, x, y)
        jax.block_until_ready(state.states)
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        trace = sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))[-1]
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events

    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(("$", "Thunk", "PjitFunction")):
            total[e["name"]] += e.get("dur", 0)
            count[e["name"]] += 1
    n = args.updates
    print(f"{args.dataset} split {args.split}, {args.depth}x{args.width}, m = {x.shape[0]}: "
          f"{wall / n * 1e3:.1f} ms per update (wall-clock, {n} updates after {args.warmup})")
    print(f"{'ms/update':>10} {'runs/update':>12}  kernel  [shape  op]")
    for name, us in total.most_common(args.top):
        m = re.search(r"%" + re.escape(name) + r" = (\S+) .*?op_name=\"([^\"]*)\"", hlo)
        where = f"{m.group(1)[:32]}  {m.group(2).replace('jit(update)/', '')[-90:]}" if m else ""
        print(f"{us / n / 1e3:10.2f} {count[name] / n:12.1f}  {name[:30]:30s} {where}")


if __name__ == "__main__":
    main()
