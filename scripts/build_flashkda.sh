#!/usr/bin/env bash
# Build MoonshotAI FlashKDA (the benchmark's third implementation, forward only) from the source
# tree in .flashkda/ against the CUTLASS/CuTe headers of the nvidia-cutlass wheel, and install it
# (the flash_kda package and its flash_kda_C extension) into FLASHKDA_TARGET.
#
#   bash scripts/build_flashkda.sh            # on the GPU machine, after .whl/*.whl went to /tmp/site
#
# Why this script and not FlashKDA's own instructions: its setup.py expects CUTLASS as a git
# submodule at .flashkda/cutlass (include/, examples/common/, tools/util/include/) and runs
# `git submodule update` and `git rev-parse`; the GPU machine has no network and .flashkda/ is a
# plain `git archive` export. The nvidia-cutlass wheel ships the same three folders under
# cutlass_library/source/, so the build links `cutlass` to that folder. FlashKDA's sources are not
# changed: the build runs on a copy in a scratch folder, with a `git` on PATH that declines (its
# git calls fail harmlessly, with or without git installed) and no build output in the checkout.
#
# Making .flashkda/ (on a machine with network; an ignored folder, carried to the GPU machine):
#   git clone https://github.com/MoonshotAI/FlashKDA /tmp/fk && mkdir .flashkda \
#     && git -C /tmp/fk archive HEAD | tar -x -C .flashkda && git -C /tmp/fk rev-parse HEAD > .flashkda/FLASHKDA_COMMIT
# (its docs/ folder, 2.3 MB of pictures, is not needed: rm -rf .flashkda/docs).
#
# Environment:
#   FLASHKDA_SRC      FlashKDA source tree (default: .flashkda in the repository root)
#   CUTLASS_SOURCE    folder holding include/ (and examples/, tools/) of CUTLASS; default: found
#                     from the installed nvidia-cutlass package (cutlass_library/source)
#   FLASHKDA_TARGET   where flash_kda/ and flash_kda_C*.so are installed (default /tmp/site)
#   FLASHKDA_BUILD    scratch build folder (default /tmp/flashkda_build)
#   FLASH_KDA_CUDA_ARCHS  default 90a (FlashKDA's setup.py reads it)
#   MAX_JOBS (default 16), NVCC_THREADS (default 4), PYTHON (default python3)
# Exit status: 0 built and imported; 2 missing inputs; 1 build or import failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SRC="${FLASHKDA_SRC:-$ROOT/.flashkda}"
TARGET="${FLASHKDA_TARGET:-/tmp/site}"
BUILD="${FLASHKDA_BUILD:-/tmp/flashkda_build}"

if [ ! -f "$SRC/setup.py" ] || [ ! -f "$SRC/flash_kda/__init__.py" ]; then
  echo "build_flashkda: no FlashKDA source tree at $SRC (setup.py, flash_kda/__init__.py)"; exit 2
fi
if [ -z "${CUTLASS_SOURCE:-}" ]; then
  # find_spec locates the package without importing it: cutlass_library's own imports need
  # packages (cuda-python, pydot, treelib) that only its Python generator uses, not the headers.
  CUTLASS_SOURCE=$("$PY" -c "
import importlib.util, os
spec = importlib.util.find_spec('cutlass_library')
print(os.path.join(os.path.dirname(spec.origin), 'source') if spec and spec.origin else '')")
fi
if [ ! -f "${CUTLASS_SOURCE:-/nonexistent}/include/cute/tensor.hpp" ] \
    || [ ! -f "$CUTLASS_SOURCE/include/cutlass/cutlass.h" ]; then
  echo "build_flashkda: no CUTLASS headers at '${CUTLASS_SOURCE:-}' (install the nvidia-cutlass wheel, e.g."
  echo "  pip install --no-deps --target /tmp/site .whl/nvidia_cutlass-*.whl, put /tmp/site on PYTHONPATH,"
  echo "  or set CUTLASS_SOURCE to a folder holding include/cute and include/cutlass)"
  exit 2
fi

import_check() {  # in a fresh interpreter that sees TARGET added to the current path
  PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "
import flash_kda, flash_kda_C
print('build_flashkda: import ok:', flash_kda.__file__, flash_kda_C.__file__,
      'workspace bytes for T=8192, H=32, N=2:', flash_kda_C.get_workspace_size(16384, 32, 2))" \
    || { echo "build_flashkda: import FAILED"; exit 1; }
}

# A build already in TARGET from the same sources, headers, archs and torch is reused (a second
# device_check.sh run in the same call, or on a machine still warm, skips the compile).
commit=$(cut -c1-8 "$SRC/FLASHKDA_COMMIT" 2>/dev/null || echo unknown)
cutlass_version=$("$PY" -c "import importlib.metadata as m; print(m.version('nvidia-cutlass'))" 2>/dev/null || echo "?")
build_hash=$( (cd "$SRC" && find . -type f ! -path './cutlass/*' | LC_ALL=C sort | xargs cat;
               echo "$CUTLASS_SOURCE $cutlass_version ${FLASH_KDA_CUDA_ARCHS:-90a}";
               "$PY" -c "import torch; print(torch.__version__)") | sha256sum | cut -c1-16)
if [ "$(cat "$TARGET/.flashkda_build_hash" 2>/dev/null)" == "$build_hash" ] \
    && ls "$TARGET"/flash_kda_C*.so >/dev/null 2>&1; then
  echo "build_flashkda: reusing the build in $TARGET (same sources, headers, archs and torch)"
  import_check
  exit 0
fi

rm -rf "$BUILD" && mkdir -p "$BUILD" && cp -r "$SRC/." "$BUILD/"
# The archive holds an empty folder where the submodule would be: replace it with the link.
rm -rf "$BUILD/cutlass" && ln -s "$CUTLASS_SOURCE" "$BUILD/cutlass"
# FlashKDA's setup.py runs `git submodule update` unconditionally, and subprocess.run raises where
# git is not installed; a git that only says no keeps the build independent of git and network.
mkdir -p "$BUILD/.nogit"
printf '#!/bin/sh\necho "git is off for this build (CUTLASS comes from nvidia-cutlass)" >&2\nexit 1\n' \
  > "$BUILD/.nogit/git"
chmod +x "$BUILD/.nogit/git"
echo "build_flashkda: FlashKDA $commit, CUTLASS headers $CUTLASS_SOURCE (nvidia-cutlass $cutlass_version), archs ${FLASH_KDA_CUDA_ARCHS:-90a}"

t0=$(date +%s)
(cd "$BUILD" && PATH="$BUILD/.nogit:$PATH" FLASH_KDA_CUDA_ARCHS="${FLASH_KDA_CUDA_ARCHS:-90a}" FLASH_KDA_VERSION_SUFFIX="+$commit" \
   MAX_JOBS="${MAX_JOBS:-16}" NVCC_THREADS="${NVCC_THREADS:-4}" \
   "$PY" setup.py build_ext --inplace) > "$BUILD/build.log" 2>&1
rc=$?
secs=$(( $(date +%s) - t0 ))
if [ $rc -ne 0 ]; then
  tail -n 40 "$BUILD/build.log"
  echo "build_flashkda: build FAILED (rc=$rc) after $secs s; full log $BUILD/build.log"; exit 1
fi
so=$(ls "$BUILD"/flash_kda_C*.so 2>/dev/null | head -n1)
if [ -z "$so" ]; then
  echo "build_flashkda: the build produced no flash_kda_C*.so in $BUILD"; exit 1
fi
mkdir -p "$TARGET" && rm -rf "$TARGET/flash_kda" "$TARGET"/flash_kda_C*.so "$TARGET/.flashkda_build_hash"
cp -r "$BUILD/flash_kda" "$so" "$TARGET/"
spills=$(grep -cE "[1-9][0-9]* bytes spill (stores|loads)" "$BUILD/build.log")
echo "build_flashkda: built in $secs s ($spills ptxas lines with spills), installed into $TARGET"
import_check
echo "$build_hash" > "$TARGET/.flashkda_build_hash"
