#!/usr/bin/env bash
# Run FLA's own KDA tests (tests/ops/test_kda.py, chunk tests by default) on a GPU with kda_ext
# registered as FLA's backend. FLA's test files are not part of this repository (nor of FLA's wheels
# or sdists): put them in .fla_upstream/tests/ (ignored by git) first, e.g. from a clone of
# fla-org/flash-linear-attention:
#   mkdir -p .fla_upstream/tests/ops
#   git -C <fla clone> show <commit>:tests/conftest.py > .fla_upstream/tests/conftest.py
#   git -C <fla clone> show <commit>:tests/ops/test_kda.py > .fla_upstream/tests/ops/test_kda.py
# FLA itself comes from the interpreter, or from .whl/*.whl as in scripts/device_check.sh.
# Usage: bash scripts/fla_upstream_tests.sh [pytest args]   (default: -k chunk)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -f .fla_upstream/tests/ops/test_kda.py ]; then
  echo "fla_upstream_tests: .fla_upstream/tests/ops/test_kda.py is missing (see this script's header)"
  exit 2
fi
if ! "$PY" -c "import kda_ext" >/dev/null 2>&1; then
  KDA_EXT_CUDA="${KDA_EXT_CUDA:-1}" MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace 2>&1 | tail -n 3
fi
if [ -d .whl ] && ls .whl/fla*.whl .whl/flash_linear*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla_site .whl/fla*.whl .whl/flash_linear*.whl
  export PYTHONPATH="/tmp/fla_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT/scripts:$ROOT:${PYTHONPATH:-}"
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(-k chunk)
cd .fla_upstream/tests
# fla_untuned (first, before anything imports FLA): FLA's kernels run untuned default configs
# instead of autotuning every shape for minutes; FLA_UNTUNED=0 keeps FLA's autotune.
"$PY" -m pytest -q -p fla_untuned -p pytest_kda_ext_fla ops/test_kda.py "${ARGS[@]}"
