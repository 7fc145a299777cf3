#!/usr/bin/env bash
# The leased GPU machine's build of kda_ext, made here (no device time spent compiling; a build made
# on that machine's own toolchain also crashes on C++ exceptions: docs/developer.md), packed to be
# carried: OUTDIR/_C.cpython-312-x86_64-linux-gnu.so.gz (debug info stripped, ~7.5 MB), _C.srchash
# (device_check.sh's hash of these sources: its build step then reuses the .so) and
# _build_config.py.
#
#   bash scripts/dev/prebuild_for_device.sh OUTDIR
#
# On the device: `PREBUILT=OUTDIR bash scripts/device_check.sh ...` (carry OUTDIR, ignored by git,
# e.g. under /ab/ in .git/info/exclude), or device_ab.sh's A_PREBUILT / PATCH.prebuilt.
# The venv (Python 3.12, torch 2.11.0 = cu130 as on the device, nvidia-cutlass, ninja; ~5 GB, made
# on first use) is $KDA_DEVICE_VENV (default /tmp/kda_device_venv); the sources are copied to
# $KDA_PREBUILD_DIR (default /tmp/kda_prebuild) and built there incrementally (first build ~5 min
# on 2 cores, one changed kernel header ~1 min).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[ $# -eq 1 ] || { echo "usage: prebuild_for_device.sh OUTDIR"; exit 2; }
OUTDIR="$1"
VENV="${KDA_DEVICE_VENV:-/tmp/kda_device_venv}"
SECTIONS="${KDA_EXT_PROFILE_SECTIONS:-0}"
# A KDA_EXT_PROFILE_SECTIONS=1 build (kernels print section timings) builds apart and carries a hash
# that device_check.sh never takes for these sources: install it by hand for the profile run.
SUFFIX=""; [ "$SECTIONS" = 1 ] && SUFFIX=_sections  # (a failing $(...) in an assignment ends a set -e script)
WORK="${KDA_PREBUILD_DIR:-/tmp/kda_prebuild$SUFFIX}"
# (a pyenv shim may exist without the version being active: take the interpreter that runs)
PY312="${PYTHON312:-}"
for cand in $(ls /root/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null) $(command -v python3.12 || true); do
  [ -n "$PY312" ] && break
  "$cand" -c "" 2>/dev/null && PY312="$cand"
done
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  [ -n "$PY312" ] || { echo "prebuild_for_device: no python3.12 found (set PYTHON312)"; exit 1; }
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 numpy ninja setuptools wheel "nvidia-cutlass==4.2.0.0"
fi
mkdir -p "$WORK"
cd "$ROOT"
# Copy what changed (so ninja rebuilds only those units).
for f in setup.py pyproject.toml $(git ls-files --cached --others --exclude-standard csrc kda_ext); do
  cmp -s "$f" "$WORK/$f" 2>/dev/null || { mkdir -p "$WORK/$(dirname "$f")"; cp "$f" "$WORK/$f"; }
done
(cd "$WORK" && CUDA_HOME="$CUDA_HOME" KDA_EXT_CUDA=1 KDA_EXT_PROFILE_SECTIONS="$SECTIONS" MAX_JOBS="${MAX_JOBS:-2}" \
   "$VENV/bin/python" setup.py build_ext --inplace > "$WORK/build.log" 2>&1) \
  || { tail -n 40 "$WORK/build.log"; exit 1; }
grep -E "spill" "$WORK/build.log" || true
mkdir -p "$OUTDIR"
so=$(ls "$WORK"/kda_ext/_C*.so | head -n1)
strip --strip-debug -o "$OUTDIR/.so.tmp" "$so"
gzip -c "$OUTDIR/.so.tmp" > "$OUTDIR/$(basename "$so").gz" && rm "$OUTDIR/.so.tmp"
cp "$WORK/kda_ext/_build_config.py" "$OUTDIR/"
# device_check.sh's hash, computed on this checkout's files (LC_ALL=C: the same order everywhere)
hash=$(cat setup.py $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -c1-16)
echo "$hash$([ "$SECTIONS" = 1 ] && echo +sections)" > "$OUTDIR/_C.srchash"
echo "prebuild_for_device: $OUTDIR/$(basename "$so").gz ($(du -h "$OUTDIR/$(basename "$so").gz" | cut -f1)), hash $(cat "$OUTDIR/_C.srchash")"
