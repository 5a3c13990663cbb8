#!/usr/bin/env bash
# One GPU session in two steps, for a lent GPU machine that has torch and triton but no Rust and no internet.
#
#   bash benchmarks/gpu_session.sh prepare    # here (Rust toolchain + maturin): builds the abi3 wheel into .gpu/
#   bash benchmarks/gpu_session.sh run [bench args...]   # there, in the repo root, with .gpu carried along
#
# `run` installs the wheel into /tmp/site, records the machine (nvidia-smi, torch, triton), runs the tier-2 tests
# (`pytest -m gpu`) and then `difattn bench --device cuda --backward`, writing everything under $OUT (or
# ./gpu-out): env.txt, gpu-tests.log, bench.log and <date>-<gpu>.json for benchmarks/results/. Each step has its
# own time limit (GPU_TEST_TIMEOUT, GPU_BENCH_TIMEOUT seconds) so one hang cannot eat the other's results.
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
    rm -rf .gpu && mkdir -p .gpu
    maturin build --release --out .gpu
    ls -l .gpu
}

run() {
    local out="${OUT:-$PWD/gpu-out}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
        || { echo "wheel install failed: run 'prepare' here first and carry .gpu" >&2; return 1; }
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        python3 -c "import sys, torch, triton, difattn; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__, 'difattn', difattn.__version__)"
        python3 -m difattn info
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"
    timeout "${GPU_TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests 2>&1 | tee "$out/gpu-tests.log"
    local gpu
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')
    timeout "${GPU_BENCH_TIMEOUT:-240}" python3 -m difattn bench --device cuda --backward \
        --json "$out/$(date +%F)-${gpu:-gpu}.json" "$@" 2>&1 | tee "$out/bench.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare | run [difattn bench args...]" >&2; exit 2 ;;
esac
