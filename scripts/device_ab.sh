#!/usr/bin/env bash
# A/B on one GPU in one call: benchmark this checkout (A), apply a patch (B), rebuild, run the CUDA
# tests and the same benchmark on B, then take the patch back out. Both timings come from one
# machine in one run, so their ratio is one the perf notes may quote.
#
#   bash scripts/device_ab.sh PATCH [extra device_check steps for B, e.g. margins,sanitize]
#
# PATCH: a `git diff` of the change, e.g. `git diff main wip/x > ab/x.patch`, with `/ab/` in
# .git/info/exclude and `ab` named in the device call's carry. Environment: OUT, BENCH_ARGS (as
# device_check.sh; default: the main shape, kimi and softplus, forward/backward/forward+backward,
# kda_ext only).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PATCH="${1:?usage: device_ab.sh PATCH [steps]}"
EXTRA="${2:-}"
OUT="${OUT:-/tmp/kda_out}"
mkdir -p "$OUT"
export BENCH_ARGS="${BENCH_ARGS:---shapes 2x8192x32x128 --modes kimi,softplus --what fwd,bwd,fwdbwd --impls ours}"

apply() {  # $1: empty to apply, -R to revert
  if command -v git >/dev/null 2>&1; then git apply $1 "$PATCH"; else patch -p1 $1 < "$PATCH"; fi
}

OUT="$OUT/a" bash scripts/device_check.sh build,bench > "$OUT/a.txt" 2>&1
echo "== A (this checkout)"; grep -E "^\|" "$OUT/a/bench.md" 2>/dev/null || tail -n 20 "$OUT/a.txt"
if ! apply ""; then
  echo "the patch does not apply"; exit 1
fi
OUT="$OUT/b" bash scripts/device_check.sh "build,test,bench${EXTRA:+,$EXTRA}" > "$OUT/b.txt" 2>&1
rc=$?
echo "== B (with $PATCH)"; grep -E "^\|" "$OUT/b/bench.md" 2>/dev/null || true
tail -n 12 "$OUT/b.txt"
apply -R || echo "warning: could not take the patch back out"
# Fewer files come back than the two runs write: keep the tables and summaries, pack the rest.
(cd "$OUT" && tar czf ab_logs.tgz a b && rm -rf a b)
exit $rc
