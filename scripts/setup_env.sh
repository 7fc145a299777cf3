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
# Build in place (editable): the compiled kda_ext/_C*.so lands beside the Python sources.
"$PY" setup.py build_ext --inplace 2>&1 | tail -n 5
"$PY" -c "import kda_ext, kda_ext._build_config as c; print('kda_ext built: WITH_CUDA =', c.WITH_CUDA)"
export PY
