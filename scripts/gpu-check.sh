#!/usr/bin/env bash
# GPU check, under five minutes on one GPU, each part under its own timeout:
# 1. bench/decode.py: four V4-Flash layers at real dims (batched decode at 8K with CUDA graphs,
#    context sweep, 4K prefill) and kernel profiles of one step at batch 1 and 64 (real launches).
# 2. The kernel tests on CUDA: compiled kernels in fp32/fp16/bf16, the paged ops in every KV format,
#    FP8 block-scaled GEMM, the MXFP4 grouped MoE, decode CUDA graphs replayed against eager logits.
# 3. bench/kernels.py: Flash and Pro shapes against the torch fallbacks, share of the H200's peaks.
# Needs only torch, triton, numpy, safetensors (and pytest for the tests).
# Run from anywhere on a machine with an NVIDIA GPU:   scripts/gpu-check.sh
# Writes gpu-check.log, bench-decode.txt, decode.json, decode-profile.txt, tests.txt, bench-kernels.txt
# and kernels.json under $OUT if set, else under bench/results/. Exit status 0 only if all pass.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

# A bare GPU machine has torch and triton but no installed v4d: map the import root onto this
# checkout (v4d.kernels = kernels/, v4d.serving = serving/) through a throwaway package folder.
if ! "$PY" -c "import v4d.kernels.ops, v4d.serving.config" 2>/dev/null; then
  SHIM="$(mktemp -d)"
  mkdir -p "$SHIM/v4d"
  : > "$SHIM/v4d/__init__.py"
  ln -s "$PWD/kernels" "$SHIM/v4d/kernels"
  ln -s "$PWD/serving" "$SHIM/v4d/serving"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
unset TRITON_INTERPRET V4D_KERNELS

"$PY" - <<'PY' 2>&1 | tee "$DEST/gpu-check.log" || exit 1
import sys, torch, triton
assert torch.cuda.is_available(), "no CUDA device visible"
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "device", torch.cuda.get_device_name())
PY

export PYTHONUNBUFFERED=1
status=0
# The decode bench first (the figures the README reports), with kernel profiles at batch 1 and 64.
timeout 100 "$PY" bench/decode.py --device cuda --profile 1 --profile 64 --out "$DEST/decode.json" 2>&1 \
  | tee "$DEST/bench-decode.txt" || status=1
if "$PY" -c "import pytest" 2>/dev/null; then
  # (test_compiles_for_gpu.py is the GPU-less stand-in for what these tests do for real here)
  # --confcutdir: only tests/kernels/conftest.py, not the suite's top conftest (cluster helpers)
  # several workers when pytest-xdist is there: the time goes to compiling kernels, on the CPU cores
  PAR=""; "$PY" -c "import xdist" 2>/dev/null && PAR="-n 8"
  V4D_TEST_DEVICE=cuda timeout 120 "$PY" -m pytest tests/kernels $PAR -q -p no:cacheprovider -o addopts="" \
    --confcutdir tests/kernels \
    --deselect tests/kernels/test_compiles_for_gpu.py 2>&1 \
    | tee "$DEST/tests.txt" || status=1
else
  echo "pytest is not installed here: tests/kernels skipped; the bench below still checks every kernel" \
       "against the torch reference at the bench shapes" | tee "$DEST/tests.txt"
fi
timeout 60 "$PY" bench/kernels.py --out "$DEST/kernels.json" 2>&1 | tee "$DEST/bench-kernels.txt" || status=1
echo "gpu-check: $([ $status = 0 ] && echo PASS || echo FAIL); results in $DEST" | tee -a "$DEST/gpu-check.log"
exit $status
