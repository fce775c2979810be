"""What compiling one ALM `update` costs: seconds and fused kernels, by source.

XLA:CPU compiles every fused kernel of a program to machine code on its
own (≈ 20–25 ms each on this machine: its fusion emitter, then LLVM), so
the number of fused kernels sets the compile time, and on a 10 s budget
compilation is a third of the run (RESULTS.md, Round 7). For each network
this prints the time `init` and the compilation of `jax.jit(update)` take
(the minimum over `--reps` fresh compilations, caches cleared in between),
the fused kernels outside fused computations, and with `--by-source` how
many of them come from each line of `alm_jax` (the innermost frame of the
library in their stack).

    python benchmarks/compile_cost.py
    python benchmarks/compile_cost.py --nets kin8nm:1:50 concrete:4:16 --by-source
    python benchmarks/compile_cost.py --nets kin8nm:1:50 --compilation-cache /tmp/jax_cache
    python benchmarks/compile_cost.py --option backtrack=True     # an option of alm_jax.alm

With `--compilation-cache DIR` JAX's persistent compilation cache is on:
the first repetition (with an empty DIR) compiles, the later ones load the
executable from DIR, as a second run of the same training would; every
repetition's seconds are printed.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import re
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

import alm_jax  # noqa: E402


def _table(lines, name):
    """A numbered section of the HLO text's stack-frame tables."""
    start, out = lines.index(name) + 1, {}
    for line in lines[start:]:
        m = re.match(r"(\d+) (.*)", line)
        if not m:
            break
        out[int(m.group(1))] = m.group(2)
    return out


def fused_kernels(hlo: str):
    """Source (file:line of the innermost alm_jax frame, or '?') of every fusion outside fused computations."""
    lines = hlo.split("\n")
    files = {k: v.strip('"') for k, v in _table(lines, "FileNames").items()}
    funcs = {k: v.strip('"') for k, v in _table(lines, "FunctionNames").items()}
    locs = {}
    for k, v in _table(lines, "FileLocations").items():
        d = dict(re.findall(r"(\w+)=(\d+)", v))
        locs[k] = (files[int(d["file_name_id"])], funcs[int(d["function_name_id"])], int(d["line"]))
    frames = {}
    for k, v in _table(lines, "StackFrames").items():
        d = dict(re.findall(r"(\w+)=(\d+)", v))
        frames[k] = (int(d["file_location_id"]), int(d["parent_frame_id"]) - 1)  # printed 1-based, 0 = none

    def source(frame):
        seen = set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc, frame = frames[frame]
            path, func, line = locs[loc]
            if "/alm_jax/" in path:
                return f"{path.split('/alm_jax/')[-1]}:{line} ({func})"
        return "?"

    found = []
    for comp in re.split(r"\n(?=(?:ENTRY )?%[\w.\-]+ \()", hlo):
        name = comp.split(" ", 1)[0]
        if "fused" in name or "wrapped" in name:
            continue
        for line in comp.split("\n")[1:]:
            if re.search(r"=\s*\S+\s+fusion\(", line):
                m = re.search(r"stack_frame_id=(\d+)", line)
                found.append(source(int(m.group(1))) if m else "?")
    return found


def measure(net, reps, options):
    ds, depth, width = net.split(":")
    data = alm_jax.datasets.load_uci(ds, split=0)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    model = eqx.nn.MLP(x.shape[1], y.shape[1], int(width), int(depth), activation=jnp.tanh, key=jax.random.key(0))
    inits, compiles = [], []
    for _ in range(reps):
        jax.clear_caches()
        solver = alm_jax.alm(**options)
        t = time.perf_counter()
        state = jax.block_until_ready(solver.init(model, x, y))
        inits.append(time.perf_counter() - t)
        t = time.perf_counter()
        compiled = jax.jit(solver.update).lower(state, x, y).compile()
        compiles.append(time.perf_counter() - t)
    return inits, compiles, fused_kernels(compiled.as_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="*", default=["kin8nm:1:50", "concrete:4:16"],
                    help="data set:depth:width (tanh MLPs)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--by-source", action="store_true", help="count fused kernels per source line")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--compilation-cache", default=None, metavar="DIR",
                    help="turn on JAX's persistent compilation cache in DIR")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of alm_jax.alm (VALUE a Python literal); repeatable")
    args = ap.parse_args(argv)
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--option {item!r}: expected KEY=VALUE")
        options[key] = ast.literal_eval(value)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # The first compilation in a process pays a one-time setup; keep it out.
    jax.jit(lambda a: jnp.tanh(a) @ a.T).lower(jnp.ones((3, 3))).compile()
    print(f"# compile cost of alm({', '.join(args.option)}).update, float64, XLA_FLAGS={os.environ['XLA_FLAGS']!r}, {jax.devices()[0]}")
    print(f"{'network':16s} {'init s':>7s} {'compile s':>10s} {'fused kernels':>14s}")
    out = {}
    for net in args.nets:
        all_inits, all_compiles, kernels = measure(net, args.reps, options)
        t_init, t_compile = min(all_inits), min(all_compiles)
        print(f"{net:16s} {t_init:7.2f} {t_compile:10.2f} {len(kernels):14d}")
        if args.compilation_cache:
            print(f"    per repetition: init s {', '.join(f'{t:.2f}' for t in all_inits)}; "
                  f"compile s {', '.join(f'{t:.2f}' for t in all_compiles)}")
        out[net] = {"init_s": t_init, "compile_s": t_compile, "init_s_all": all_inits, "compile_s_all": all_compiles,
                    "fused_kernels": len(kernels), "by_source": collections.Counter(kernels)}
        if args.by_source:
            for src, n in collections.Counter(kernels).most_common(25):
                print(f"    {n:4d}  {src}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"XLA_FLAGS": os.environ["XLA_FLAGS"], "reps": args.reps, "options": args.option,
                       "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
