#!/usr/bin/env bash
# kda_ext: make an environment with torch and build the extension into it (in place).
# Sourced by scripts/demo.sh and scripts/test.sh; sets $PY to the interpreter to use.
#
# If the chosen interpreter (PYTHON, default python3) already imports torch (a GPU machine with a
# CUDA build of torch, say), the extension is built against that torch. Otherwise a virtual
# environment .venv is made and torch==${KDA_EXT_TORCH_VERSION:-2.13.0} installed into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch==${KDA_EXT_TORCH_VERSION:-2.13.0}"
  fi
fi
"$PY" -m pip install -q pytest numpy ninja setuptools wheel
# KDA_EXT_TEST_FLA=1 (CI sets it): also install flash-linear-attention and triton, which import on a
# machine without a GPU, so the FLA tests (tests/test_fla_backend.py, FLA's layer in tests/test_nn.py
# and the README's FLA example) run against FLA's real registry and layer; without them they skip.
if [ "${KDA_EXT_TEST_FLA:-0}" = "1" ]; then
  "$PY" -m pip install -q flash-linear-attention triton
fi
# The CUDA build and scripts/check_cuda_compile.py use only nvidia-cutlass's headers (CuTe,
# CUTLASS): its Python dependencies (cuda-python, scipy, ...) are not needed.
"$PY" -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
# Without a CUDA device no test would run the CUDA kernels, and compiling them for sm_90a takes
# minutes: build CPU-only there unless KDA_EXT_CUDA says otherwise (the CUDA sources are still
# checked to compile by scripts/check_cuda_compile.py, a separate step of .ci/run).
cuda_mode="${KDA_EXT_CUDA:-}"
if [ -z "$cuda_mode" ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  cuda_mode=0
  echo "kda_ext: no CUDA device: building CPU-only (set KDA_EXT_CUDA=auto or 1 to compile the CUDA kernels anyway)"
fi
# Build in place (editable): the compiled kda_ext/_C*.so lands beside the Python sources.
KDA_EXT_CUDA="${cuda_mode:-auto}" "$PY" setup.py build_ext --inplace 2>&1 | tail -n 5
"$PY" -m kda_ext
export PY
