#!/usr/bin/env bash
# Issue 5's targets table (benchmarks/targets.py) on one GPU machine, side by side with FLA.
#
#   bash scripts/device_targets.sh tune    # FLA's autotune of the target configurations, run
#                                          # while kda_ext builds; returns triton_autotune.tgz
#   bash scripts/device_targets.sh table   # the timed runs (FLA and kda_ext in one process per
#                                          # run) and $OUT/targets.md
#   bash scripts/device_targets.sh tune,table
#
# Why two steps: FLA autotunes every new shape for minutes (more than one device call can run),
# and its choices land in the Triton cache. `tune` fills that cache for the target shapes beside
# the build (CPU work), so `table` times configurations FLA has already tuned, as a trained user
# sees them. Carry `.whl` (FLA wheels) and `.triton_cache`; unpack a returned triton_autotune.tgz
# into the checkout (it holds .triton_cache/...) and carry it again when the next call needs it.
# First-call latency is always measured with an empty cache (bench_chunk_kda.py does that).
# Environment: OUT (default /tmp/kda_out), TUNE_TIMEOUT (seconds per configuration, default 240).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/kda_out}"
STEPS="${1:-tune,table}"
mkdir -p "$OUT"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$ROOT/.triton_cache" TRITON_CACHE_AUTOTUNING=1
PY="${PYTHON:-python3}"
BENCH="$PY benchmarks/bench_chunk_kda.py"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  || { echo "device_targets.sh: FLA wheels missing from .whl/"; exit 2; }
export PYTHONPATH="/tmp/site:$ROOT"

# The configurations of benchmarks/targets.py, grouped as the timed runs below measure them: the
# small shape's target is forward only, so FLA's backward there is never tuned or timed.
SMALL="--shapes 1x1024x16x128 --modes kimi --what fwd"
MAIN="--shapes 2x8192x32x128 --modes kimi,softplus --what fwd,bwd,fwdbwd"
LONG="--shapes 1x32768x16x128,varlen16x32768x16x128 --modes kimi --what fwd,bwd,fwdbwd"

# FLA's autotune results (not the compiled kernels: too large to come back) as
# $OUT/triton_autotune.tgz, to unpack into the checkout and carry next time.
keep_autotune() {
  local tuned
  tuned=$(find .triton_cache -name '*.autotune.json' 2>/dev/null)
  [ -n "$tuned" ] && printf '%s\n' "$tuned" | tar czf "$OUT/triton_autotune.tgz" -T - \
    && echo "autotune results kept: $(printf '%s\n' "$tuned" | wc -l) files in triton_autotune.tgz"
}

if has tune; then
  (for cfg in "$SMALL" "--shapes 1x32768x16x128 --modes kimi" "--shapes varlen16x32768x16x128 --modes kimi" \
              "$MAIN"; do
     t0=$(date +%s)
     timeout "${TUNE_TIMEOUT:-240}" $BENCH --impls fla $cfg > /dev/null 2>&1
     echo "tune: rc=$? in $(( $(date +%s) - t0 )) s: $cfg"
   done) > "$OUT/tune.log" 2>&1 &
  OUT="$OUT/check" bash scripts/device_check.sh build | tail -n 3
  wait
  cat "$OUT/tune.log"
  keep_autotune
fi

if has table; then
  OUT="$OUT/check" bash scripts/device_check.sh build | tail -n 2
  common="--impls fla,ours --first-call-impls ours"
  rc=0
  for run in "small:$SMALL --copy-rate" "main:$MAIN" "long:$LONG"; do
    name="${run%%:*}"
    timeout "${BENCH_TIMEOUT:-400}" $BENCH ${run#*:} $common --json "$OUT/t_$name.json" \
        --out "$OUT/t_$name.md" > "$OUT/t_$name.log" 2>&1 || rc=1
    cat "$OUT/t_$name.md" 2>/dev/null || tail -n 20 "$OUT/t_$name.log"
  done
  "$PY" benchmarks/targets.py "$OUT"/t_*.json --out "$OUT/targets.md" --png "$OUT/targets.png" || rc=1
  keep_autotune  # the timed runs may have tuned what the tune step's time limits cut short
  # The device tool brings back about eight files: targets.md, the JSON files and the autotune
  # archive stay as they are, the per-run tables and logs travel as one archive.
  (cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz t_*.md t_*.log check 2>/dev/null \
     && rm -rf t_*.md t_*.log check)
  exit $rc
fi
