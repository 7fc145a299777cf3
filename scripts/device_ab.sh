#!/usr/bin/env bash
# A/B on one GPU in one call: this checkout (A) and, for each patch, a copy of it with the patch
# applied (B). All variants build at once (the build is bound by its longest translation unit, so
# parallel builds cost little more than one), then each runs device_check.sh's steps in turn: the
# timings come from one machine in one run, so their ratios are ones the perf notes may quote.
#
#   bash scripts/device_ab.sh PATCH[@STEPS] [PATCH[@STEPS] ...]
#
# PATCH: a `git diff` of the change, e.g. `git diff main BRANCH -- csrc > ab/NAME.patch`, with `/ab/` in
# .git/info/exclude and `ab` named in the device call's carry. Environment: OUT; BENCH_ARGS (as
# device_check.sh; default: the main shape, kimi and softplus, forward/backward/forward+backward,
# kda_ext only); B_STEPS (device_check.sh steps for each patch, default build,test,bench; add
# margins,sanitize for a patch about to be merged, or build,bench to screen several patches);
# A_STEPS (the same for the checkout, default build,bench); AB_DIR (where the copies go, default /tmp/kda_ab);
# A_PREBUILT (see install_prebuilt).
# Per-variant settings: a file PATCH with .env in place of .patch (A: $A_ENV, if set) is sourced
# before that variant's steps, e.g. BENCH_ARGS with the shapes only that patch is about.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ $# -ge 1 ] || { echo "usage: device_ab.sh PATCH [PATCH ...]"; exit 2; }
OUT="${OUT:-/tmp/kda_out}"
AB_DIR="${AB_DIR:-/tmp/kda_ab}"
mkdir -p "$OUT"
export BENCH_ARGS="${BENCH_ARGS:---shapes 2x8192x32x128 --modes kimi,softplus --what fwd,bwd,fwdbwd --impls ours}"
B_STEPS="${B_STEPS:-build,test,bench}"
A_STEPS="${A_STEPS:-build,bench}"

# A build made elsewhere for a variant (PATCH with .prebuilt in place of .patch, or $A_PREBUILT for A):
# a folder with _C*.so (or _C*.so.gz), _C.srchash and _build_config.py, copied into that variant's
# kda_ext/ so that device_check.sh's build step reuses it when the hash matches the variant's sources.
install_prebuilt() {
  local from="$1" to="$2/kda_ext" f
  [ -d "$from" ] || return 0
  for f in "$from"/_C*.so.gz; do [ -e "$f" ] && gunzip -c "$f" > "$to/$(basename "$f" .gz)"; done
  for f in "$from"/_C*.so "$from"/_C.srchash "$from"/_build_config.py; do [ -e "$f" ] && cp "$f" "$to/"; done
  echo "== prebuilt $(basename "$from") -> $to (hash $(cat "$from/_C.srchash" 2>/dev/null))"
}
names=(A); dirs=("$ROOT"); steps=("$A_STEPS"); envs=("${A_ENV:-}")
[ -n "${A_PREBUILT:-}" ] && install_prebuilt "$A_PREBUILT" "$ROOT"
rm -rf "$AB_DIR"
rc=0
for arg in "$@"; do
  # PATCH@STEPS runs STEPS for that patch instead of B_STEPS (e.g. ab/x.patch@build,bench).
  patch="${arg%%@*}"
  this_steps="$B_STEPS"
  [ "$arg" != "$patch" ] && this_steps="${arg#*@}"
  name=$(basename "$patch" .patch)
  dir="$AB_DIR/$name"
  mkdir -p "$dir"
  tar -C "$ROOT" --exclude=./.git --exclude=./ab --exclude=./build --exclude=./.triton_cache -cf - . | tar -C "$dir" -xf -
  patch_file="$(cd "$(dirname "$patch")" && pwd)/$(basename "$patch")"
  if (cd "$dir" && if command -v patch >/dev/null; then patch -p1 -s < "$patch_file"; else git apply "$patch_file"; fi); then
    names+=("$name"); dirs+=("$dir"); steps+=("$this_steps")
    install_prebuilt "${patch_file%.patch}.prebuilt" "$dir"
    env_file="${patch_file%.patch}.env"; [ -f "$env_file" ] || env_file=""
    envs+=("$env_file")
  else
    echo "== $name: the patch does not apply"; rc=1
  fi
done

# Build every variant at once; device_check.sh then finds each build current and reuses it.
t0=$(date +%s)
jobs=$(( 16 / ${#names[@]} )); [ "$jobs" -ge 2 ] || jobs=2
for i in "${!names[@]}"; do
  MAX_JOBS=$jobs OUT="$OUT/${names[$i]}" bash "${dirs[$i]}/scripts/device_check.sh" build \
      > "$OUT/${names[$i]}.build.txt" 2>&1 &
done
wait
echo "== ${#names[@]} builds in parallel: $(( $(date +%s) - t0 )) s"

for i in "${!names[@]}"; do
  (if [ -n "${envs[$i]}" ]; then set -a; source "${envs[$i]}"; set +a; fi
   OUT="$OUT/${names[$i]}" bash "${dirs[$i]}/scripts/device_check.sh" "${steps[$i]}") > "$OUT/${names[$i]}.txt" 2>&1 || rc=1
  echo "== ${names[$i]} (${steps[$i]})"
  grep -E "^\|" "$OUT/${names[$i]}/bench.md" 2>/dev/null || true
  sed -n '/==== summary/,$p' "$OUT/${names[$i]}.txt"
done
# Fewer files come back than the runs write: everything travels as one archive.
(cd "$OUT" && tar czf ab_logs.tgz --exclude=ab_logs.tgz ./* && find . -mindepth 1 ! -name ab_logs.tgz -exec rm -rf {} +)
exit $rc
