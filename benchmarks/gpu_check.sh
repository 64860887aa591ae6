#!/usr/bin/env bash
# The GPU check of issue 16, in one go (under 8 minutes on one GPU; each step gets what is left of the budget):
#   1. the requires_cuda tests (CUDA-graph replay == eager, bf16 token agreement, no allocation growth; the TensorRT
#      and onnxruntime-gpu tests skip themselves where those packages are missing)
#   2. benchmarks/gpu_latency.py on cuda for the small and qwen2.5-0.5b shapes (torch engine: fp32 CUDA graphs,
#      fp32 eager, bf16 CUDA graphs; blockdiff vs AR vs full diffusion, ms per chunk)
#   3. benchmarks/decode_latency.py --device cuda --dtype bfloat16 --no-peers on the small shape (the torch engine on
#      the GPU beside ONNX Runtime on the CPU, same exported weights)
#   4. summary.md: the tables README's "GPU and Jetson" section takes
# Needs: an NVIDIA GPU, a python ($PYTHON, else the first of .venv/bin/python, python3, /opt/torch/.venv/bin/python3
# whose torch sees a GPU) with a CUDA build of torch, transformers, safetensors, pyyaml, numpy, pytest (and onnx,
# onnxscript, onnxruntime for the export in 1 and 3). No TensorRT, no onnxruntime-gpu, no ROS, no network: nothing
# is installed or downloaded; the package runs from this checkout (PYTHONPATH). Writes 7 files.
#
#   bash benchmarks/gpu_check.sh                  # writes into $OUT (if set) or out/gpu_check/
#   bash benchmarks/gpu_check.sh --dry-run-cpu    # the same steps on the CPU at toy sizes (checks the script; the
#                                                 # requires_cuda test bodies and the cuda engine set run on the CPU)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEST=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$DEST"
LOG=$DEST/gpu_check.log
BUDGET=${GPU_CHECK_BUDGET_S:-470}  # seconds for everything
START=$(date +%s)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-30}

DRY=0
[ "${1:-}" = --dry-run-cpu ] && DRY=1
if [ "$DRY" = 1 ]; then
    DEVICE=cpu; SMALL=tiny; BIG=tiny; RUNS_SMALL=1; RUNS_BIG=1; RUNS_DL=1; THREADS=1
    export BLOCKVLA_GPU_TESTS_ON_CPU=1  # the requires_cuda tests run their bodies on the CPU (test/conftest.py)
    VARIANTS=--gpu-variants  # gpu_latency times the cuda engine set (and computes its speedups) on the CPU
else
    DEVICE=cuda; SMALL=small; BIG=qwen2.5-0.5b; RUNS_SMALL=20; RUNS_BIG=10; RUNS_DL=5
    THREADS=$(( $(nproc) > 8 ? 8 : $(nproc) )); VARIANTS=
fi

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
FAILED=()
step() {  # step NAME MAX_SECONDS COMMAND... : runs with min(MAX, what is left), logs, records a failure
    local name=$1 max=$2; shift 2
    local t; t=$(left)
    [ "$t" -gt "$max" ] && t=$max
    if [ "$t" -lt 20 ]; then say "SKIP $name: the time budget is spent"; FAILED+=("$name (no time left)"); return; fi
    say "START $name (limit ${t}s): $*"
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] && say "OK $name" || { say "FAIL $name (exit $rc$([ "$rc" = 124 ] && echo ', timed out'))"; FAILED+=("$name"); }
}

# --- the interpreter: $PYTHON, else the first of this checkout's .venv, python3 and /opt/torch/.venv (the GPU
# machine's image) whose torch sees a GPU (any torch: dry run), else python3 (the env step then says what is wrong) --
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    PY=python3
    for cand in .venv/bin/python python3 /opt/torch/.venv/bin/python3; do
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c "import torch, sys; sys.exit(not ($DRY or torch.cuda.is_available()))" 2>/dev/null; then
            PY=$cand; break
        fi
    done
fi
: > "$LOG"
say "python: $PY ($(command -v "$PY" 2>/dev/null || echo not found)); output: $DEST; budget ${BUDGET}s; dry run: $DRY"
"$PY" - "$DEST/env.json" "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, json, platform, sys
env = {'python': sys.version.split()[0], 'machine': platform.machine(), 'missing': []}
for name in ('torch', 'transformers', 'safetensors', 'yaml', 'numpy', 'pytest', 'onnx', 'onnxscript', 'onnxruntime',
             'tensorrt'):
    try:
        env[name] = getattr(importlib.import_module(name), '__version__', 'present')
    except Exception as e:  # noqa: BLE001
        env['missing'].append(f'{name} ({type(e).__name__})')
import torch
env['cuda'] = torch.version.cuda
env['gpus'] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
try:
    import onnxruntime
    env['onnxruntime_providers'] = onnxruntime.get_available_providers()
except Exception:  # noqa: BLE001
    env['onnxruntime_providers'] = []
json.dump(env, open(sys.argv[1], 'w'), indent=1)
print(json.dumps(env))
print('TensorRT: ' + env.get('tensorrt', 'not installed: its tests skip, nothing of it is checked'))
print('onnxruntime CUDA provider: ' + ('present' if 'CUDAExecutionProvider' in env['onnxruntime_providers'] else
                                       'absent (no onnxruntime-gpu): its test skips'))
if sys.argv[2] == 'cuda' and not torch.cuda.is_available():
    sys.exit('this torch sees no CUDA GPU: nothing to check (bash benchmarks/gpu_check.sh --dry-run-cpu checks the script)')
EOF
if [ "${PIPESTATUS[0]}" != 0 ]; then say "stopped: no usable torch/GPU (see above)"; exit 2; fi

step requires_cuda_tests 170 "$PY" -m pytest -q -rA -p no:cacheprovider -m requires_cuda \
    test/test_torch_static_engine.py test/test_runtime_ort.py --junitxml "$DEST/requires_cuda.xml"
step "gpu_latency $SMALL" 80 "$PY" benchmarks/gpu_latency.py --device "$DEVICE" --shape "$SMALL" --runs "$RUNS_SMALL" \
    --threads "$THREADS" $VARIANTS --json "$DEST/gpu_latency_small.json"
step "gpu_latency $BIG" 170 "$PY" benchmarks/gpu_latency.py --device "$DEVICE" --shape "$BIG" --runs "$RUNS_BIG" \
    --threads "$THREADS" $VARIANTS --json "$DEST/gpu_latency_qwen2.5-0.5b.json"
step "decode_latency $SMALL" 130 "$PY" benchmarks/decode_latency.py --device "$DEVICE" --dtype bfloat16 --no-peers \
    --small-config "$SMALL" --runs "$RUNS_DL" --warmup 1 --memory-predictions 0 --threads "$THREADS" \
    --json "$DEST/decode_latency_small_cuda.json"
"$PY" benchmarks/gpu_check_summary.py "$DEST" 2>&1 | tee -a "$LOG"

say "done in $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} = 0 ]
