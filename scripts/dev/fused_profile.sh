#!/usr/bin/env bash
# The fused forward on a leased GPU in one call (issue 17): its tests, its timing beside the
# two-kernel forward, and where its warps spend their time. Builds come from here:
#
#   bash scripts/dev/prebuild_for_device.sh ab/prebuilt
#   KDA_EXT_PROFILE_SECTIONS=1 bash scripts/dev/prebuild_for_device.sh ab/prebuilt_sections
#   (device call, carry ab and .whl if FLA should be there)
#   OUT=$OUT bash scripts/dev/fused_profile.sh ab/prebuilt ab/prebuilt_sections
#
# Steps (each time-limited, one log $OUT/fused_profile.log): install the release build; the fused
# tests; bench_chunk_kda --what fwd --impls ours with KDA_EXT_FUSED_FWD off / on with 1 and 2
# producers (SHAPES, MODES); then the sections build and scripts/dev/fused_sections.py for 1 and 2
# producers at SECTION_SHAPE. BASELINE=DIR (another release prebuild, e.g. the commit before a
# kernel change) is timed first, fused with 1 and 2 producers, in the same call.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
RELEASE="${1:?usage: fused_profile.sh RELEASE_PREBUILT [SECTIONS_PREBUILT]}"
SECTIONS="${2:-}"
OUT="${OUT:-/tmp/kda_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/fused_profile.log") 2>&1
export PYTHONUNBUFFERED=1 FLA_FLASH_KDA=0 PYTHONPATH="$ROOT:${PYTHONPATH:-}"
PY="${PYTHON:-python3}"
SHAPES="${SHAPES:-2x8192x32x128,1x8192x96x128}"
MODES="${MODES:-kimi,softplus}"
SECTION_SHAPE="${SECTION_SHAPE:-2x8192x32x128}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
install() {  # a prebuild_for_device.sh folder into kda_ext/
  local f
  for f in "$1"/_C*.so.gz; do gunzip -c "$f" > "kda_ext/$(basename "$f" .gz)"; done
  cp "$1/_build_config.py" kda_ext/
  echo "installed $1 (hash $(cat "$1/_C.srchash"))"
}
bench() {  # label, then KDA_EXT_FUSED_FWD and KDA_EXT_FUSED_PRODUCERS
  echo "== $1: KDA_EXT_FUSED_FWD=$2 KDA_EXT_FUSED_PRODUCERS=$3"
  KDA_EXT_FUSED_FWD=$2 KDA_EXT_FUSED_PRODUCERS=$3 timeout "${BENCH_TIMEOUT:-60}" "$PY" benchmarks/bench_chunk_kda.py \
      --shapes "$SHAPES" --modes "$MODES" --what fwd --impls ours --out "$OUT/bench_$1_$2$3.md" > /dev/null 2>&1
  grep "^| [0-9v]" "$OUT/bench_$1_$2$3.md"
}
if [ -n "${BASELINE:-}" ]; then
  install "$BASELINE"
  bench baseline on 1
  bench baseline on 2
fi
install "$RELEASE"
timeout "${TEST_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_fwd_sm90.py 2>&1 | tail -n 3
for variant in "off 1" "on 1" "on 2"; do
  bench release $variant
done
if [ -n "$SECTIONS" ]; then
  install "$SECTIONS"
  for producers in 1 2; do
    echo "== sections, $producers producer(s), $SECTION_SHAPE"
    timeout 60 "$PY" scripts/dev/fused_sections.py --shape "$SECTION_SHAPE" --producers "$producers"
  done
  install "$RELEASE"
fi
