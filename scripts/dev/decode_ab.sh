#!/usr/bin/env bash
# A/B of the decode kernel without torch: REV's csrc/cuda/fused_recurrent.cuh against the working
# tree's, compiled side by side into one binary (compile here, run the binary on the GPU machine).
#   bash scripts/dev/decode_ab.sh [REV=HEAD] [OUTDIR=build/decode_ab]   -> OUTDIR/decode_ab
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REV="${1:-HEAD}"
OUTDIR="${2:-$ROOT/build/decode_ab}"
mkdir -p "$OUTDIR"
git -C "$ROOT" show "$REV:csrc/cuda/fused_recurrent.cuh" | sed 's/namespace recurrent {/namespace recurrent_old {/' > "$OUTDIR/fr_old.cuh"
sed 's/namespace recurrent {/namespace recurrent_new {/' "$ROOT/csrc/cuda/fused_recurrent.cuh" > "$OUTDIR/fr_new.cuh"
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I"$ROOT/csrc" -I"$OUTDIR" \
    -o "$OUTDIR/decode_ab" "$ROOT/scripts/dev/decode_ab.cu"
echo "decode_ab: $OUTDIR/decode_ab ($REV vs the working tree)"
