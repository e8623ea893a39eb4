#!/usr/bin/env bash
# Validate cnnkern on a bare GPU machine: build, tests, self-check, benchmarks, static checks.
#
#   scripts/gpu_validate.sh OUTDIR
#
# For a machine whose python3 already has torch, triton, ninja and pytest (no network: nothing is
# downloaded; the stack may be older than CI's, e.g. Python 3.12, torch 2.11, triton 3.6). Every
# step logs to OUTDIR/<step>.log and the script goes on past a failing step; a summary at the end
# lists each step's status and duration, and the exit status is 1 if any step failed.
#
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (nvcc
# jobs), CNNKERN_PREBUILT (default 1: use a prebuilt extension whose key matches, see build below),
# CNNKERN_GIT_COMMIT (the commit to record in the results when this tree has no .git),
# STEPS (the optional steps to run, space-separated, in the order to run them, each NAME or
# NAME:SECONDS, a cap on that step's time; default: pytest-cuda-conv pytest-gpu pytest-all
# selfcheck bench ptxas inspect sanitize; a misspelt name fails at once; and, only when named: overhead (scripts/gpu_overhead.py: host vs kernel time of a conv call),
# bench-host (benchmarks/bench_host.py --device cuda: host time per warm call of every op, PyTorch's beside),
# bench-quick (`cnnkern bench --quick`, its duration is logged), bench-graph (the same subset timed
# as CUDA-graph replays: kernel time without host launch cost, into OUTDIR/results-graph),
# bench-mma (the quick conv2d layers with the CUDA convolution pinned to its mma.sync kernel, into
# OUTDIR/results-mma: compare with bench-quick, where an H100 runs wgmma), bench-tune (the same
# layers with CNNKERN_CUDA_CONV_ALGO=tune: each layer's fastest kernel, tile and split-K setting,
# into OUTDIR/results-tune: compare with bench-quick), bench-split (the quick
# conv2d layers at batch 1 with split-K on and off, into OUTDIR/results-split and -nosplit), and
# degradation (scripts/degradation.py on the GPU: plain vs residual, depth 20/56, 3 seeds)). The first steps,
# nvidia-smi, versions, build (incremental) and importable, always run.
#
# OUTDIR receives: nvidia-smi/versions/build/... logs, junit XML of the test runs, the benchmark
# JSON (OUTDIR/results/ and a copy in OUTDIR/), ptxas.txt (per-kernel resource usage of cnnkern._C)
# and summary.txt. Commit the JSON under the benchmarks/results/ directory printed in the summary.
#
# A GPU session of fixed length (about 15 minutes for a whole session, start included):
#   DEADLINE_S   seconds for the whole script from its start. A step that would start with less
#                than STEP_MIN_S (default 45) left is skipped and listed as such; each step after
#                the build runs in its own process group and gets SIGINT (pytest then writes its
#                junit XML and summary), then SIGTERM/SIGKILL, when its share runs out; the bench
#                steps get `--time-limit` so that they stop by themselves and write what they
#                measured. RESERVE_S (default 25) is kept for the summary and PACK.
#   PACK         a path: OUTDIR packed into that one .tar.gz at the end (a session brings back
#                only a few files).
#   TEST_WORKERS pytest -n for the test steps (default 8 where pytest-xdist is importable, else
#                serial); CNNKERN_NVCC_THREADS (default 3: the three GPU targets of a file at once)
#                for the build.
#
# The sanitize step runs scripts/sanitize_run.py (every op forward and backward once, small CUDA
# tensors, each GPU backend, several layouts and dtypes) under compute-sanitizer's memcheck and
# racecheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1; its logs are OUTDIR/sanitize-<tool>.log and any
# reported error fails the step (and so the script). COMPUTE_SANITIZER overrides the tool's path.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cd "$root"

PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"  # torch would otherwise guess /usr/local (no libcudart)

export CNNKERN_NVCC_THREADS="${CNNKERN_NVCC_THREADS:-3}"

steps=()
failed=0
summary="$out/summary.txt"
: > "$summary"
deadline=""
if [ -n "${DEADLINE_S:-}" ]; then
  deadline=$((SECONDS + DEADLINE_S))
fi
reserve="${RESERVE_S:-25}"
step_min="${STEP_MIN_S:-45}"
STEP_BUDGET=""  # seconds the running step may take (empty: no limit); the bench steps read it

# run_limited SECONDS CMD...: CMD in its own process group; past SECONDS it gets SIGINT, 20 s
# later SIGTERM, 10 s after that SIGKILL. Returns CMD's status, or 124 when it was stopped.
run_limited() {
  local limit="$1" pid t0=$SECONDS
  shift
  set -m
  "$@" &
  pid=$!
  set +m
  while kill -0 "$pid" 2> /dev/null; do
    if [ $((SECONDS - t0)) -ge "$limit" ]; then
      echo "[gpu_validate] time share of $limit s used up: SIGINT" >&2
      kill -INT -- "-$pid" 2> /dev/null
      for sig in TERM KILL; do
        local n=0
        while kill -0 "$pid" 2> /dev/null && [ $n -lt $([ $sig = TERM ] && echo 20 || echo 10) ]; do
          sleep 1
          n=$((n + 1))
        done
        kill -0 "$pid" 2> /dev/null && kill -"$sig" -- "-$pid" 2> /dev/null
      done
      wait "$pid" 2> /dev/null
      return 124
    fi
    sleep 1
  done
  wait "$pid"
}

# step NAME CMD...: run CMD with its output in OUTDIR/NAME.log; record status and duration.
# Under DEADLINE_S the step is skipped when too little time is left, and limited to what is.
step() {
  local name="$1"
  shift
  local log="$out/$name.log" t0=$SECONDS rc status
  STEP_BUDGET="${step_cap:-}"
  if [ -n "$deadline" ]; then
    local left=$((deadline - SECONDS - reserve))
    if [ -z "$STEP_BUDGET" ] || [ "$left" -lt "$STEP_BUDGET" ]; then
      STEP_BUDGET=$left
    fi
    if [ "$left" -lt "$step_min" ]; then
      steps+=("$(printf '%-12s %-7s %4ds  %s' "$name" "SKIP" 0 "not started: ${left} s left of DEADLINE_S=$DEADLINE_S")")
      echo "[gpu_validate] $name: skipped (${left} s left of DEADLINE_S=$DEADLINE_S, less reserve)"
      return 0
    fi
  fi
  printf '[gpu_validate] %-12s ... ' "$name"
  if [ -n "$STEP_BUDGET" ]; then
    run_limited "$STEP_BUDGET" "$@" > "$log" 2>&1
  else
    "$@" > "$log" 2>&1
  fi
  rc=$?
  if [ $rc -eq 0 ]; then
    status=ok
  elif [ $rc -eq 124 ] && [ -n "$STEP_BUDGET" ]; then
    status=TIMEOUT
  else
    status=FAIL:$rc
  fi
  steps+=("$(printf '%-12s %-7s %4ds  %s' "$name" "$status" $((SECONDS - t0)) "$log")")
  [ $rc -eq 0 ] || failed=1
  echo "$([ $rc -eq 0 ] && echo ok || echo "$status, last lines of $log:")  ($((SECONDS - t0)) s)"
  [ $rc -eq 0 ] || tail -n 15 "$log" | sed 's/^/    /'
  return 0
}

# --time-limit for a bench step: its share less a minute for the report, plots and the timing
# under way (nothing when there is no deadline)
bench_limit() {
  if [ -n "$STEP_BUDGET" ]; then
    echo "--time-limit $((STEP_BUDGET > 120 ? STEP_BUDGET - 60 : STEP_BUDGET / 2))"
  fi
}

# pytest -n for the test steps: TEST_WORKERS, default 8 where pytest-xdist is importable
xdist_args() {
  local n="${TEST_WORKERS:-}"
  if [ -z "$n" ]; then
    "$PY" -c "import xdist" 2> /dev/null && n=8 || n=0
  fi
  [ "$n" != 0 ] && [ "$n" != 1 ] && echo "-n $n"
}

versions() {
  "$PY" - <<'EOF'
import platform, shutil, subprocess, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
for mod in ("ninja", "pytest", "tqdm", "setuptools", "wheel"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "present"))
    except ImportError:
        print(mod, "absent")
print("CUDA available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
EOF
  echo "CUDA_HOME=$CUDA_HOME"
  "$CUDA_HOME/bin/nvcc" --version || command -v nvcc
}

build() {
  # An extension built on the development machine for this stack and sent here (scripts/dev
  # device-setup; scripts/prebuilt.py) is used as it is when its key matches these sources, this
  # Python and torch, and it loads (CNNKERN_PREBUILT=0: always compile). Otherwise: an incremental
  # ninja build of cnnkern/_C*.so, in place, with this machine's torch.
  if [ "${CNNKERN_PREBUILT:-1}" != 0 ] && "$PY" scripts/prebuilt.py check; then
    return 0
  fi
  "$PY" setup.py build_ext --inplace
}

# cnnkern.kernels and cnnkern.benchmarks are the top-level kernels/ and benchmarks/ directories,
# mapped by setup.py's package_dir: a plain PYTHONPATH does not see them. An offline editable
# install maps them; where that fails (no wheel package, old pip), symlinks inside the tree do.
importable() {
  local probe='import cnnkern, cnnkern.kernels, cnnkern.benchmarks.harness, cnnkern.cli; print("cnnkern from", cnnkern.__file__, "| _C loaded:", cnnkern._backend.has_extension(), "| _host loaded:", cnnkern.ops._plan._host is not None)'
  echo "== offline editable install"
  if CNNKERN_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
      && (cd / && "$PY" -c "$probe"); then
    echo "mode: editable install"
    echo editable > "$out/.import_mode"
    return 0
  fi
  echo "== editable install unusable: symlinks cnnkern/kernels -> ../kernels, cnnkern/benchmarks -> ../benchmarks + PYTHONPATH"
  for pkg in kernels benchmarks; do
    if [ ! -e "cnnkern/$pkg" ]; then
      ln -s "../$pkg" "cnnkern/$pkg" || return 1
    fi
  done
  (cd / && PYTHONPATH="$root" "$PY" -c "$probe") || return 1
  echo "mode: PYTHONPATH + symlinks (do not commit cnnkern/kernels or cnnkern/benchmarks)"
  echo symlinks > "$out/.import_mode"
}

# The CUDA C++ convolution and conv-BN-ReLU first (written without a GPU: the most likely to
# fail; CI runs them on the CPU emulator of tests/cuda_emulator.py, which checks their logic but
# not the hardware), so that a short device session learns about them before anything else.
pytest_cuda_conv() {
  # shellcheck disable=SC2046
  "$PY" -m pytest -q -ra --maxfail=20 $(xdist_args) --junitxml="$out/pytest-cuda-conv.xml" tests/test_conv2d.py \
    tests/test_conv_bn_relu.py -k "cuda and not triton"
}
# shellcheck disable=SC2046
pytest_gpu() { "$PY" -m pytest -m gpu -q -ra $(xdist_args) --junitxml="$out/pytest-gpu.xml"; }
# shellcheck disable=SC2046
pytest_all() { "$PY" -m pytest -q -ra $(xdist_args) --junitxml="$out/pytest-all.xml"; }
selfcheck() { "$PY" -m cnnkern.selfcheck; }

# The bench steps keep what they measured even when a provider failed (the JSON lists failures);
# a kernel that leaves the CUDA context unusable or hangs costs only its own figures: `cnnkern
# bench` runs the suite in a worker process and resumes it in a fresh one without that provider.
# shellcheck disable=SC2046
bench() {
  local rc=0
  "$PY" -m cnnkern.cli bench --out "$out/results" --no-progress $(bench_limit) || rc=$?
  cp "$out"/results/*.json "$out/" 2> /dev/null
  return $rc
}

# shellcheck disable=SC2046
bench_quick() {
  local rc=0
  "$PY" -m cnnkern.cli bench --quick --out "$out/results" --no-progress $(bench_limit) || rc=$?
  cp "$out"/results/*.json "$out/" 2> /dev/null
  return $rc
}
# shellcheck disable=SC2046
bench_graph() { "$PY" -m cnnkern.cli bench --quick --graph --out "$out/results-graph" --no-progress $(bench_limit); }
# the CUDA C++ convolution on its mma.sync implicit GEMM (on an H100 "auto" takes wgmma): the
# same quick layers, to compare the two tensor-core kernels (cnnkern bench --compare)
# shellcheck disable=SC2046
bench_mma() {
  CNNKERN_CUDA_CONV_ALGO=igemm "$PY" -m cnnkern.cli bench --quick --ops conv2d --backends cuda --no-inductor \
    --out "$out/results-mma" --no-progress $(bench_limit)
}
# the same quick layers with the CUDA convolution's kernel, tile and split-K setting timed per
# layer on its first call (CNNKERN_CUDA_CONV_ALGO=tune; the bench's check takes that call; the
# step's log lists each layer's choice with every candidate's time, and OUTDIR/tune-cache.json
# holds them as CNNKERN_TUNE_CACHE writes them):
# what the size heuristics leave on the table (cnnkern bench --compare against bench-quick)
# shellcheck disable=SC2046
bench_tune() {
  CNNKERN_CUDA_CONV_ALGO=tune CNNKERN_TUNE_LOG=1 CNNKERN_TUNE_CACHE="$out/tune-cache.json" \
    "$PY" -m cnnkern.cli bench --quick --ops conv2d --backends cuda --no-inductor \
    --out "$out/results-tune" --no-progress $(bench_limit)
}
# split-K's worth: ResNet-50's conv layers at batch 1 (where the few-tile layers split), both
# backends, with split-K as the kernels choose it and turned off (CNNKERN_CONV_SPLIT_K=off), into
# OUTDIR/results-split and OUTDIR/results-nosplit (cnnkern bench --compare the two)
bench_split() {
  local rc=0 limit=()
  [ -n "$STEP_BUDGET" ] && limit=(--time-limit $(((STEP_BUDGET - 20) / 2 > 10 ? (STEP_BUDGET - 20) / 2 : 10)))
  "$PY" -m cnnkern.cli bench --quick --batch 1 --ops conv2d --no-inductor --out "$out/results-split" \
    --no-progress "${limit[@]}" || rc=$?
  CNNKERN_CONV_SPLIT_K=off "$PY" -m cnnkern.cli bench --quick --batch 1 --ops conv2d --no-inductor \
    --out "$out/results-nosplit" --no-progress "${limit[@]}" || rc=$?
  return $rc
}
overhead() { "$PY" scripts/gpu_overhead.py; }
# host time per warm call of every public op on the real driver, PyTorch's own layers beside
# (benchmarks/bench_host.py --device cuda): calibrates the instruction counts CI gates without a GPU
bench_host() { "$PY" -m benchmarks.bench_host --device cuda --json "$out/bench_host.json"; }
degradation() {
  "$PY" scripts/degradation.py --epochs 40 --seeds 0,1,2 --channels-last --out "$out/degradation"
}

ptxas() {
  local so tool
  # this interpreter's extension (a tree may hold one per Python, e.g. a prebuilt cpython-312 one)
  so="cnnkern/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  [ -f "$so" ] || { echo "no $so: the build step did not produce the extension"; return 1; }
  # CUDA_HOME's, PATH's, or the one inside Triton's wheel (cnnkern._inspect looks in that order)
  tool="$("$PY" -c 'from cnnkern._inspect import cuobjdump; print(cuobjdump() or "")')"
  [ -n "$tool" ] || { echo "cuobjdump not found (CUDA_HOME/bin, PATH, Triton's backends/nvidia/bin)"; return 1; }
  "$tool" --dump-resource-usage "$so" > "$out/ptxas.txt" || return 1
  echo "$so -> $out/ptxas.txt"
  grep -c "Function" "$out/ptxas.txt" | sed 's/^/kernels listed: /'
}

inspect() { "$PY" -m cnnkern._inspect; }

# compute-sanitizer over every kernel: zero errors is the bar. Prints the first reported errors and
# fails when the tool reports any, when the driver script fails, or when the tool cannot be found.
sanitize() {
  local tool rc status=0 log summary
  tool="${COMPUTE_SANITIZER:-}"
  for cand in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer" \
              "$(command -v compute-sanitizer 2>/dev/null)"; do
    [ -z "$tool" ] && [ -n "$cand" ] && [ -x "$cand" ] && tool="$cand"
  done
  [ -n "$tool" ] || { echo "SANITIZER NOT FOUND: no compute-sanitizer in CUDA_HOME ($CUDA_HOME) or PATH"; return 1; }
  "$tool" --version | head -n 2
  for check in memcheck racecheck; do
    log="$out/sanitize-$check.log"
    echo "== $check: $tool --tool $check $PY scripts/sanitize_run.py  (log: $log)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool" --tool "$check" --error-exitcode 97 --print-limit 50 \
      "$PY" scripts/sanitize_run.py > "$log" 2>&1
    rc=$?
    summary="$(grep -E "ERROR SUMMARY: [0-9]+ error" "$log" | tail -n 1)"
    echo "   exit $rc; ${summary:-no ERROR SUMMARY line}"
    if [ $rc -ne 0 ] || ! grep -qE "ERROR SUMMARY: 0 errors" "$log"; then
      status=1
      echo "!! $check FAILED (exit $rc). First reported problems:"
      grep -E "^========= (Invalid|Program hit|Race|Error|Uninitialized|Malloc|Leaked)|^FAIL " "$log" | head -n 20 | sed 's/^/   /'
      tail -n 5 "$log" | sed 's/^/   /'
    fi
  done
  [ $status -eq 0 ] && echo "compute-sanitizer: memcheck and racecheck report 0 errors"
  return $status
}

selected="${STEPS:-pytest-cuda-conv pytest-gpu pytest-all selfcheck bench ptxas inspect sanitize}"
# the function of an optional step (empty for an unknown name)
step_fn() {
  case "$1" in
    pytest-cuda-conv|pytest-gpu|pytest-all|selfcheck|bench|ptxas|inspect|sanitize|overhead|bench-host|bench-quick|\
    bench-graph|bench-mma|bench-tune|bench-split|degradation) echo "${1//-/_}" ;;
  esac
}
for item in $selected; do  # fail before the build, not after it, on a misspelt step
  name="${item%%:*}"
  cap="${item#"$name"}"
  cap="${cap#:}"
  if [ -z "$(step_fn "$name")" ] || { [ -n "$cap" ] && ! [[ "$cap" =~ ^[0-9]+$ ]]; }; then
    echo "$0: STEPS: unknown step or bad time cap '$item' (NAME or NAME:SECONDS; names: pytest-cuda-conv" \
      "pytest-gpu pytest-all selfcheck bench ptxas inspect sanitize overhead bench-host bench-quick bench-graph bench-mma" \
      "bench-tune bench-split degradation)" >&2
    exit 2
  fi
done

step nvidia-smi nvidia-smi
step versions versions
step build build
step importable importable
if [ "$(cat "$out/.import_mode" 2>/dev/null)" = symlinks ]; then
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
# the optional steps, in the order STEPS names them; NAME:SECONDS caps a step's time (under
# DEADLINE_S, or alone: a cap makes the step time-limited too)
for item in $selected; do
  name="${item%%:*}"
  cap="${item#"$name"}"
  cap="${cap#:}"
  step_cap="$cap" step "$name" "$(step_fn "$name")"
done

commit_dir="$("$PY" -c 'import os; from cnnkern.benchmarks import harness as h; print(os.path.relpath(h.default_out_dir(h.environment()), h.REPO_ROOT))' 2>/dev/null)"
{
  echo "cnnkern GPU validation, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname)"
  for line in "${steps[@]}"; do echo "  $line"; done
  echo
  if ls "$out"/results/*.json > /dev/null 2>&1; then
    echo "benchmark JSON: $out/*.json (commit it as ${commit_dir:-benchmarks/results/<gpu>-<date>}/)"
  fi
  if [ $failed -eq 0 ]; then echo "all steps passed"; else echo "SOME STEPS FAILED"; fi
} | tee "$summary"
if [ -n "${PACK:-}" ]; then
  # one archive for the session's few returned files (OUTDIR inside it as its base name)
  tar -czf "$PACK" -C "$(dirname "$out")" "$(basename "$out")" && echo "packed $out into $PACK ($(du -h "$PACK" | cut -f1))"
fi
exit $failed
