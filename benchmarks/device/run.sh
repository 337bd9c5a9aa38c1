#!/usr/bin/env bash
# Runs ON the GPU machine, from the repository root, with .device-kit carried
# (benchmarks/device/prepare.sh). Writes JSON results and logs to $OUT; each step has its own time
# limit so that one slow step cannot lose the others' figures. About 8 minutes in all.
set -uo pipefail
OUT=${OUT:-/tmp/segnn-device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device-kit/wheels/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1  # the checkout first: a wheel brings a "tests" package
python3 -c 'import jax, e3nn_jax, haiku, jraph; print("jax", jax.__version__, jax.devices(),
"e3nn-jax", e3nn_jax.__version__, "haiku", haiku.__version__)' 2>&1 | tee "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv | tee -a "$OUT/env.txt"
batches=.device-kit/batches
step() {  # step NAME SECONDS COMMAND...: one step, its log in $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $?"; tail -n 12 "$OUT/$name.log"
}
# 1. Our default path (e3nn-jax tensor products) on the three configurations.
step throughput 260 python3 benchmarks/throughput.py --configs nbody qm9 oc20 --batches "$batches" \
    --repeats 30 --max-seconds 10 --out "$OUT/throughput_gpu.json"
# 2. The cuequivariance backend on the same batches.
step throughput_cue 150 python3 benchmarks/throughput.py --configs nbody qm9 --batches "$batches" \
    --backend cuequivariance --repeats 30 --max-seconds 10 --out "$OUT/throughput_gpu_cue.json"
# 3. Mixed precision (bfloat16 tensor products, float32 accumulation).
step throughput_bf16 100 python3 benchmarks/throughput.py --configs nbody qm9 --batches "$batches" \
    --compute-dtype bfloat16 --repeats 30 --max-seconds 10 --out "$OUT/throughput_gpu_bf16.json"
# 4. The two backends agree on the GPU (outputs and gradients; the CPU suite checks this too).
step cue_tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_tensor_product_cue.py
