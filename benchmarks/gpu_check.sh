#!/usr/bin/env bash
# The GPU checks a session with a lent device should run first, in one call
# of under 10 minutes: the float32 accuracy and singular-system tests, the
# "auto" options' tests (the CPU's rules pinned, the accelerator's), float32
# kin8nm with ALM's products at "highest" and at JAX's default, and the step's
# scale. The kin8nm runs get 20 s per split: on a cold machine the first
# split's first update missed a 10 s budget (RESULTS.md, Round 19:
# compilation, not arithmetic). From the repository root:
#
#     OUT=<folder> bash benchmarks/gpu_check.sh        # QUICK=1: a smoke run on any machine
#
# Writes logs and JSON under $OUT (default benchmarks/out/gpu_check), at most
# eight files, and prints the tables last.
set -uo pipefail
out=${OUT:-benchmarks/out/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if [ "${QUICK:-0}" = 1 ]; then splits=1 budget=6 scale="--quick"; else
  splits=2 budget=20 scale="--arch 1x50 2x64 --m 30000 100000 300000"; fi

# -m: the slow float32 rows too (kept out of CI's default run for time; the
# precision they check is what a GPU can break).
timeout 250 "$py" -m pytest -q -p no:cacheprovider --tb=short -rf -m "slow or not slow" \
  -k "float32 or singular or auto_goes or precision or spd or accelerator or auto_second_order or stride_from or training_with_a_subsample" \
  tests/test_structured_step.py tests/test_inner.py tests/test_float32.py tests/test_second_order.py \
  tests/test_curvature_samples.py > "$out/tests.log" 2>&1
for prec in highest none; do
  timeout 100 "$py" benchmarks/uci_suite.py --datasets kin8nm --splits "$splits" --budget "$budget" \
    --dtype float32 --methods alm --matmul-precision "$prec" --out "$out/kin8nm_$prec" > "$out/kin8nm_$prec.log" 2>&1
done
timeout 150 "$py" benchmarks/scale.py $scale --out "$out/scale.json" > "$out/scale.log" 2>&1
rm -f "$out"/*/*.png

tail -n 4 "$out/tests.log"
for prec in highest none; do echo "== matmul_precision=$prec"; grep -A2 "^kin8nm" "$out/kin8nm_$prec.log"; done
cat "$out/scale.log"
