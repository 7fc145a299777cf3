#!/usr/bin/env bash
# kda_ext: set up (scripts/setup_env.sh) and run the demo: chunk_kda forward+backward on the best
# device present, checked against the reference, with timings.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" scripts/demo.py "$@"
