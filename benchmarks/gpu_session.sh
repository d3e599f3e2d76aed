#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent GPU with 15 minutes in all.
#
#   bash benchmarks/gpu_session.sh --prepare   # here (network): pytest for Python 3.12 -> .gpu_site
#   bash benchmarks/gpu_session.sh             # there: device tool, carry [".gpu_site"]
#
# On the GPU box (torch 2.11+cu130, triton 3.6, Python 3.12, no network) it installs nothing:
# meshweave is imported from this checkout (meshweave/__init__.py maps the component folders),
# pytest comes from the carried .gpu_site when the box has none. Steps run in order of value,
# each under its own time limit, logs under $OUT (or ./gpu_out); a failing step does not stop
# the others (SKIP="cost_model nccl_run" leaves those out; TESTS and LLAMA_SHAPES narrow
# steps 2 and 3). Each step has its own limit, and
# all of them a deadline of TOTAL_S (585 s), under the 600 s of one device call.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    rm -rf .gpu_site
    python -m pip install -q --target .gpu_site --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        --only-binary=:all: pytest pytest-timeout
    du -sh .gpu_site
    exit $?
fi

OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export MESHWEAVE_CACHE_DIR
MESHWEAVE_CACHE_DIR=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTEST_PATH=""
python -c "import pytest" 2>/dev/null || PYTEST_PATH="$PWD/.gpu_site"

DEADLINE=$(($(date +%s) + ${TOTAL_S:-585}))  # the whole run, under the device call's 600 s

step() {  # step NAME LIMIT_S CMD...: run, log to $OUT/NAME.log, print the tail
    local name=$1 limit=$2 t0 rc left
    shift 2
    case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped (SKIP)"; return ;; esac
    left=$((DEADLINE - $(date +%s)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped, no time left"; return; fi
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   rc=$rc after $(($(date +%s) - t0)) s"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

step env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
    python -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__,
    triton.__version__, torch.version.cuda, torch.cuda.get_device_name())"'
# 1. the issue's benchmark, GPT-2 small at 1x128 and 8x512 (eager, Inductor, meshweave), with
#    each compiled model's top kernels by GPU time (the log) to work on after the session
step bench_gpt2 210 python benchmarks/codegen_bench.py --models gpt2 --profile \
    --inductor-graphs --json "$OUT/bench_gpt2.json"
# 2. the codegen tests, compiled by Triton for the GPU instead of interpreted
step tests_codegen 100 env PYTHONPATH="$PYTHONPATH${PYTEST_PATH:+:$PYTEST_PATH}" \
    python -m pytest -q --maxfail=5 -rf -p no:cacheprovider ${TESTS:-tests/test_codegen.py \
    tests/test_codegen_attention.py tests/test_codegen_units.py tests/test_codegen_cache.py \
    tests/test_codegen_fast_launch.py tests/test_codegen_causal_mask.py \
    tests/test_codegen_cuda_graphs.py}
# 3. the ~1.1B Llama at 1x128 and 8x512
step bench_llama 170 python benchmarks/codegen_bench.py --models llama --shapes ${LLAMA_SHAPES:-1x128,8x512} \
    --profile --inductor-graphs --json "$OUT/bench_llama.json"
# 4. the planner's cost model (roofline) against this GPU: fp16 GEMMs, adds, layer norms
step cost_model 40 python benchmarks/cost_model_check.py
# 5. the runtime on CUDA tensors with NCCL (one GPU: one rank; 2+ GPUs: tensor parallel)
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    step nccl_run 40 python -m meshweave run --model gpt-tiny --mesh tp=2 --device cuda \
        --train --check
else
    step nccl_run 40 python -m meshweave run --model gpt-tiny --mesh 1 --plan dp --device cuda \
        --train --check
fi
# 6. this wave's end-to-end GPU figures: W4 decoding, and hybrid CPU-GPU generation under a cap
step quant_decode 100 python benchmarks/quant_decode.py
step offload 170 python benchmarks/offload_bench.py
echo "== done; logs in $OUT"
