#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU (CI has none): the CUDA tests (every compressor on CUDA against
# the CPU, the engine with 4 ranks on one GPU against the Simulator, DDP over NCCL with the hook under
# torch.cuda.set_sync_debug_mode("error"), the parameter server's codec passes on CUDA against the CPU's; the
# CUDA async_ps worker test needs pyzmq and reports SKIP on the GPU image) and the GPU stage benchmark (each stage of a round as a ratio to clone
# of the same gradient, and the persistent memory). Uses the machine's python3 with the repo on PYTHONPATH (the GPU
# image has torch with CUDA but no registry, pytest, deepspeed, horovod or pyzmq). About 2 minutes on an H200.
#
#   tools/gpu_check.sh              # figures in $OUT (the device tool's output folder) or runs/gpu
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUTDIR=${OUT:-runs/gpu}
mkdir -p "$OUTDIR"
log="$OUTDIR/gpu_check.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }

say "== $(date -u +%Y-%m-%dT%H:%MZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
"$PY" - <<'PY' 2>&1 | tee -a "$log"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    say "no CUDA: nothing to check"
    exit 3
fi

rc=0
say "== CUDA tests (tests/test_gpu.py)"
timeout 240 "$PY" -m tests.test_gpu 2>&1 | tee -a "$log"
test "${PIPESTATUS[0]}" -eq 0 || rc=1

say "== GPU stage benchmark (benchmarks/engine.py, 25M elements, rank 0 of W=4)"
timeout 180 "$PY" benchmarks/engine.py --parts round,memory --device cuda --round-specs sign,topk:0.01,int8,fp16 \
    --round-numel 25000000 --repeats 10 --json "$OUTDIR/gpu_engine.json" 2>&1 | tee -a "$log"
test "${PIPESTATUS[0]}" -eq 0 || rc=1

say "== done, rc=$rc (log: $log)"
exit $rc
