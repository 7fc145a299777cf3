#!/usr/bin/env bash
# kda_ext on a GPU machine in one go: build against the machine's torch, run the CUDA tests,
# compute-sanitizer on small shapes, and the benchmark against FLA; results under $OUT.
#
#   bash scripts/device_check.sh [steps]     steps: any of build,test,margins,sanitize,flashkda,bench,
#                                            profile,ncu (default all but ncu)
# Environment: OUT (results folder, default /tmp/kda_out), PREBUILT (a carried build from
# scripts/dev/prebuild_for_device.sh, used when its source hash matches), PYTEST_FILES (test files, default tests:
# PYTEST_ARGS is split on spaces, so a -k expression must be one word), PYTEST_ARGS (extra pytest args,
# default "-k cuda"), BENCH_ARGS (benchmark args), PROFILE_ARGS (profile_kernels.py args, e.g.
# "--impl fla --what fwd"); FLA wheels in .whl/ are installed if present.
# The build is skipped when kda_ext/_C*.so exists and was built from the same sources (a hash of
# csrc/ and setup.py is kept beside it), so a carried .so saves the compile.
# flashkda: builds MoonshotAI FlashKDA from .flashkda/ (a `git archive` of its repository, carried)
# against the nvidia-cutlass wheel's headers (from .whl/) with scripts/build_flashkda.sh, in the
# background from the start (it needs no GPU), so it overlaps the kda_ext build and the tests; the
# bench step waits for it and includes FlashKDA when it built (the benchmark's default --impls
# has flashkda; without flash_kda it prints one line saying FlashKDA is skipped).
# Every step has a time limit (TEST_TIMEOUT, MARGINS_TIMEOUT, SANITIZE_TIMEOUT, FLASHKDA_TIMEOUT,
# BENCH_TIMEOUT, PROFILE_TIMEOUT seconds) so one slow step cannot eat a whole device lease; a step
# that hits its limit reports rc=124 in the summary.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/kda_out}"
mkdir -p "$OUT"
STEPS="${1:-build,test,margins,sanitize,flashkda,bench,profile}"
export PYTHONUNBUFFERED=1
# The scripts below import kda_ext from this checkout (built in place), wherever they live.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
summary=()
has() { [[ ",$STEPS," == *",$1,"* ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# FLA keeps its autotune results in the Triton cache (FLA_CACHE_RESULTS, on by default). The
# bench step returns just those results ($OUT/triton_autotune.tgz: the whole cache, compiled
# kernels included, was 21 MB at the main shape, too large to come back); unpack it here and carry
# .triton_cache, and the next run compiles FLA's chosen configs in seconds instead of
# benchmarking every config for minutes. First-call timings in the benchmark always use an empty
# cache.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ROOT/.triton_cache}"
# Triton >= 3.3 keeps autotune results in that cache only when asked to.
export TRITON_CACHE_AUTOTUNING="${TRITON_CACHE_AUTOTUNING:-1}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
# FLA 0.6.0 would hand its chunk_kda forward to FlashKDA by itself once flash_kda is importable
# and autograd is off; every FLA number here must stay FLA's own Triton kernels.
export FLA_FLASH_KDA=0

flashkda_pid=""
if has flashkda; then
  if [ -f .flashkda/setup.py ]; then
    # Its own folder (not /tmp/site): it joins PYTHONPATH only once the build and import worked.
    FLASHKDA_TARGET="${FLASHKDA_TARGET:-/tmp/flashkda_site}"
    FLASHKDA_TARGET="$FLASHKDA_TARGET" timeout "${FLASHKDA_TIMEOUT:-420}" bash scripts/build_flashkda.sh \
        > "$OUT/flashkda_build.log" 2>&1 &
    flashkda_pid=$!
  else
    summary+=("flashkda: no .flashkda/ in the checkout (carry it): skipped")
  fi
fi
wait_flashkda() {  # the FlashKDA build's result into the summary, once; its package on the path
  [ -z "$flashkda_pid" ] && return
  wait "$flashkda_pid"
  local rc=$?
  flashkda_pid=""
  local result
  result=$(grep -E '^build_flashkda: (built|reusing|build FAILED|import (ok|FAILED))' "$OUT/flashkda_build.log" | cut -c1-160 | tr '\n' ' ')
  cat "$OUT/flashkda_build.log"
  if [ $rc -eq 0 ]; then
    export PYTHONPATH="$FLASHKDA_TARGET:$PYTHONPATH"
    summary+=("flashkda: rc=0 $result(on the bench's PYTHONPATH)")
  else
    summary+=("flashkda: rc=$rc $result(FlashKDA left out of the bench)")
  fi
}

# LC_ALL=C: the same file order (and so the same hash) on every machine; a .so built elsewhere and
# carried, with its hash written the same way, is then reused.
src_hash=$(cat setup.py $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -c1-16)
# PREBUILT: a folder made here by scripts/dev/prebuild_for_device.sh (carried): its .so goes into
# kda_ext/ when its hash is these sources' (else the build step compiles as usual).
if [ -n "${PREBUILT:-}" ]; then
  if [ "$(cat "$PREBUILT/_C.srchash" 2>/dev/null)" == "$src_hash" ]; then
    for f in "$PREBUILT"/_C*.so.gz; do gunzip -c "$f" > "kda_ext/$(basename "$f" .gz)"; done
    cp "$PREBUILT/_C.srchash" "$PREBUILT/_build_config.py" kda_ext/
    echo "prebuilt: installed from $PREBUILT (hash $src_hash)"
  else
    echo "prebuilt: $PREBUILT was built from other sources ($(cat "$PREBUILT/_C.srchash" 2>/dev/null) != $src_hash): not used"
  fi
fi
if has build; then
  so=$(ls kda_ext/_C*.so 2>/dev/null | head -n1)
  if [ -n "$so" ] && [ "$(cat kda_ext/_C.srchash 2>/dev/null)" == "$src_hash" ]; then
    echo "build: reusing $so (sources unchanged)"; summary+=("build: reused")
  else
    t0=$(date +%s)
    if KDA_EXT_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" NVCC_THREADS="${NVCC_THREADS:-4}" \
        "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
      echo "$src_hash" > kda_ext/_C.srchash
      summary+=("build: ok in $(( $(date +%s) - t0 )) s")
    else
      tail -n 60 "$OUT/build.log"; summary+=("build: FAILED"); printf '%s\n' "${summary[@]}"; exit 1
    fi
  fi
  [ -f "$OUT/build.log" ] && grep -E "spill|stack frame" "$OUT/build.log" | sort | uniq -c | sort -rn | head -n 5
fi

if has test; then
  # -p fla_untuned: the tests that run FLA's kernels (tests/test_fla_device.py) skip FLA's
  # autotune (scripts/fla_untuned.py; FLA_UNTUNED=0 keeps it).
  PYTHONPATH="$PWD/scripts:${PYTHONPATH:-}" timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -ra -p no:cacheprovider \
    -p fla_untuned ${PYTEST_FILES:-tests} ${PYTEST_ARGS:--k cuda} > "$OUT/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 40
  summary+=("tests (${PYTEST_ARGS:--k cuda}): $(tail -n 1 "$OUT/tests.log") [rc=$rc]")
fi

if has margins; then
  # Error ratio / tolerance of every tensor over FLA's chunk and varlen matrices (the tests' margins).
  timeout "${MARGINS_TIMEOUT:-120}" "$PY" scripts/dev/error_margins.py --device cuda ${MARGINS_ARGS:-} > "$OUT/margins.log" 2>&1
  summary+=("margins: rc=$? $(tail -n 1 "$OUT/margins.log")")
  grep FAIL "$OUT/margins.log" | head -n 10
fi

if has sanitize; then
  for tool in memcheck racecheck; do
    timeout "${SANITIZE_TIMEOUT:-120}" compute-sanitizer --tool $tool --error-exitcode 9 "$PY" scripts/dev/sanitize_smoke.py > "$OUT/sanitize_$tool.log" 2>&1
    summary+=("compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -n 1)")
  done
fi

wait_flashkda

if has bench; then
  timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/bench_chunk_kda.py ${BENCH_ARGS:---shapes 2x8192x32x128,1x1024x16x128 --what fwd} \
      --out "$OUT/bench.md" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  summary+=("bench: rc=$?")
  if [ -d "$TRITON_CACHE_DIR" ]; then
    tuned=$(cd "$(dirname "$TRITON_CACHE_DIR")" && find "$(basename "$TRITON_CACHE_DIR")" -name '*.autotune.json')
    if [ -n "$tuned" ]; then
      (cd "$(dirname "$TRITON_CACHE_DIR")" && printf '%s\n' "$tuned" | tar czf "$OUT/triton_autotune.tgz" -T -)
      summary+=("autotune results kept: $(printf '%s\n' "$tuned" | wc -l) files in triton_autotune.tgz")
    fi
  fi
  cat "$OUT/bench.md" 2>/dev/null || tail -n 30 "$OUT/bench.log"
fi

# decode (not in the default steps: `bash scripts/device_check.sh build,decode`): one decode step
# of fused_recurrent_kda beside FLA's against the HBM floor (benchmarks/bench_decode.py).
if has decode; then
  timeout "${DECODE_TIMEOUT:-180}" "$PY" benchmarks/bench_decode.py --copy-rate ${DECODE_ARGS:-} > "$OUT/decode.md" 2>&1
  summary+=("decode bench: rc=$?")
  cat "$OUT/decode.md"
fi

if has profile; then
  timeout "${PROFILE_TIMEOUT:-60}" "$PY" benchmarks/profile_kernels.py ${PROFILE_ARGS:-} > "$OUT/profile.log" 2>&1
  summary+=("profile: rc=$?")
fi

if has ncu; then
  # Nsight Compute's stall counters per kernel launch of one forward+backward step (PC sampling is
  # unavailable on the leased machines; these counters work): scripts/dev/ncu_stalls.py prints a table
  # of time, instructions per warp and the top stall reasons. NCU_KERNELS: a regex of kernel names.
  timeout "${NCU_TIMEOUT:-300}" "$PY" scripts/dev/ncu_stalls.py --out "$OUT" --kernels "${NCU_KERNELS:-chunk|bwd}" \
      --count "${NCU_COUNT:-12}" ${NCU_ARGS:-} > "$OUT/ncu.log" 2>&1
  summary+=("ncu: rc=$?")
  cat "$OUT/ncu.log"
fi

# The device tool brings back a limited number of files: past eight, the logs travel as one archive.
if [ "$(ls -1 "$OUT" | wc -l)" -gt 8 ]; then
  (cd "$OUT" && tar czf logs.tgz *.log && rm -f *.log)
fi

echo "==== summary ($(head -n1 "$OUT/gpu.txt"))"
printf '%s\n' "${summary[@]}"
