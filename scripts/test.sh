#!/usr/bin/env bash
# kda_ext: set up (scripts/setup_env.sh) and run the whole test suite on every device present.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k varlen -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" -m pytest -q -ra tests "$@"
