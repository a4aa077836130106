#!/usr/bin/env bash
# The CUDA path, checked in a few minutes on a machine with an NVIDIA GPU:
#   1. the tests marked `cuda` (training steps, resume, sampling on the device);
#   2. benchmarks/train.py --device cuda at 64, 128 and 256 px (images per second and the
#      fraction of the GPU's matmul peak);
#   3. a short train + synthesize + check + export through a real worker process with
#      SYNTHRAY_DEVICE=cuda (the end-to-end worker test on the embedded stack).
# Without a CUDA device it says so and exits 0; CI never depends on it.
# Output goes to stdout and, when OUT is set, to $OUT/gpu_check.log and $OUT/train.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-}
log() { printf '[gpu-check] %s\n' "$*"; }

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    log "no CUDA device (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi
"$PY" - <<'PY'
import torch
p = torch.cuda.get_device_properties(0)
print(f"[gpu-check] torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, "
      f"{p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
PY

status=0
log "1/3 tests marked cuda"
"$PY" -m pytest -m cuda -q -p no:cacheprovider tests || status=1

log "2/3 benchmarks/train.py --device cuda (64, 128, 256 px)"
if [ -n "$OUT" ]; then
    "$PY" benchmarks/train.py --device cuda --rounds 2 | tee "$OUT/train.log" || status=1
    tail -n 1 "$OUT/train.log" > "$OUT/train.json"
else
    "$PY" benchmarks/train.py --device cuda --rounds 2 || status=1
fi

log "3/3 train, synthesize, check and export through a real worker on CUDA"
SYNTHRAY_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    "tests/workers/test_workers_e2e.py::test_pipeline_through_a_real_worker[embedded+sqlite]" \
    || status=1

log "done (exit $status)"
exit $status
