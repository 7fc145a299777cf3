#!/usr/bin/env bash
# A/B on one GPU in one call: benchmark this checkout (A), then for each patch: apply it, rebuild,
# run device_check.sh's steps on it (B), and take it back out. All timings come from one machine
# in one run, so their ratios are ones the perf notes may quote.
#
#   bash scripts/device_ab.sh PATCH [PATCH ...]
#
# PATCH: a `git diff` of the change, e.g. `git diff main wip/x -- csrc > ab/x.patch`, with `/ab/` in
# .git/info/exclude and `ab` named in the device call's carry. Environment: OUT; BENCH_ARGS (as
# device_check.sh; default: the main shape, kimi and softplus, forward/backward/forward+backward,
# kda_ext only); B_STEPS (device_check.sh steps for each patch, default build,test,bench; add
# margins,sanitize for a patch about to be merged, or use build,bench to screen several patches
# inside one call's time limit).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ $# -ge 1 ] || { echo "usage: device_ab.sh PATCH [PATCH ...]"; exit 2; }
OUT="${OUT:-/tmp/kda_out}"
mkdir -p "$OUT"
export BENCH_ARGS="${BENCH_ARGS:---shapes 2x8192x32x128 --modes kimi,softplus --what fwd,bwd,fwdbwd --impls ours}"
B_STEPS="${B_STEPS:-build,test,bench}"

apply() {  # $1: the patch; $2: empty to apply, -R to revert
  if command -v git >/dev/null 2>&1; then git apply $2 "$1"; else patch -p1 $2 < "$1"; fi
}

OUT="$OUT/A" bash scripts/device_check.sh build,bench > "$OUT/A.txt" 2>&1
echo "== A (this checkout)"
grep -E "^\|" "$OUT/A/bench.md" 2>/dev/null || tail -n 20 "$OUT/A.txt"
rc=0
for patch in "$@"; do
  name=$(basename "$patch" .patch)
  if ! apply "$patch" ""; then
    echo "== $name: the patch does not apply"; rc=1; continue
  fi
  OUT="$OUT/$name" bash scripts/device_check.sh "$B_STEPS" > "$OUT/$name.txt" 2>&1 || rc=1
  echo "== B: $name ($B_STEPS)"
  grep -E "^\|" "$OUT/$name/bench.md" 2>/dev/null || true
  sed -n '/==== summary/,$p' "$OUT/$name.txt"
  apply "$patch" -R || { echo "could not take $name back out; stopping"; rc=1; break; }
done
# Fewer files come back than the runs write: everything travels as one archive.
(cd "$OUT" && tar czf ab_logs.tgz --exclude=ab_logs.tgz ./* && find . -mindepth 1 ! -name ab_logs.tgz -exec rm -rf {} +)
exit $rc
