#!/usr/bin/env bash
# The GPU check of ffkernels: one command, bounded to 540 s in all, that brings back everything it
# measured even when a stage fails or runs out of time.
#
#   bash scripts/gpu_check.sh            # results in $OUT (default gpu_results/)
#   bash scripts/gpu_check.sh --plan     # print the phases, their budgets and, for the test phases, the number of
#                                        # cases and an estimated time (scripts/gpu_plan.py); run nothing
#   bash scripts/gpu_check.sh --full     # the full GPU suite (`pytest -m gpu`, ~1,400 cases, unbounded: for a
#                                        # session with more device time; JUnit XML in $OUT/full-gpu.xml)
#
# Phases, in order, with their time budgets in seconds (BOUNDS below; tests/test_bench.py checks that they
# add up to at most 540, so the whole run fits one 10-minute command with a minute to spare):
#   preflight         25  the GPU, whether ffkernels._C must be rebuilt, versions (env.txt); no GPU: exit 2
#   build            198  `setup.py build_ext --inplace` for this GPU's arch only (MAX_JOBS = cores), when _C
#                         is missing, was built without CUDA, or its archs (cuda_archs()) lack this GPU's
#                         compute capability (a guess: ~2 min with ninja on 16 cores, serial without ninja; 7 s
#                         went to tests-gpu-cuda for the cuda backend's autocast cases)
#   tests-cuda        62  the build tests (FFKERNELS_EXPECT_CUDA=1) and tests/test_cuda_gpu.py (7 s from the build's
#                         budget for the scff loss's low-precision cases)
#   tests-triton      35  tests/test_triton_gpu.py (each case a Triton compile)
#   bench             95  ffkernels bench --device cuda --dtype bfloat16,float32 --precision bf16, 5 repeats
#                         (bench.json rewritten after every shape and network depth; bf16 first: both targets; the
#                         float32 layer steps also under autocast: fused-cuda-bf16, labeled-cuda-bf16, floor-bf16)
#   tests-gpu-cuda    52  the behaviour tests' cuda cases (gpu and not triton), the representative selection
#                         `--gpu-smoke` (tests/gpu_selection.py: every op, dtype and option family at one or two
#                         shapes, the non-finite and host-sync case kinds, the argument checks, the long training;
#                         the conv step's cases, tests/test_conv_gpu.py, whose ~4 s came from the build's budget;
#                         the autocast cases of tests/test_autocast.py and test_conv_gpu.py, 7 s from the build's)
#   tests-gpu-triton  63  the behaviour tests' triton cases (gpu and triton), the same selection (JIT compiles);
#                         not the Triton conv step's (tests/test_conv_triton.py) nor autocast's (tests/test_autocast.py):
#                         --full only, no budget left
# The number of cases of each test phase is not typed here: --plan counts them (pytest --collect-only with the
# phase's arguments, parametrized as on a GPU) and estimates their time (scripts/gpu_plan.py says how).
#   report            10  bench.md (and bench.png) re-rendered from bench.json, the targets, summary.txt
# Each phase must end by the sum of its budget and the budgets before it: time an earlier phase leaves
# unused goes to the next ones, and the run never goes past the total. A phase that reaches its bound gets
# SIGINT (pytest then prints its summary and writes its JUnit XML; the bench saves what it has), then SIGKILL
# GRACE seconds later; both within the bound.
# Every phase runs whatever happened before it: a failed build still runs the Triton tests and the bench
# of what is available (reference, BP, floor, triton). Written as it goes, into $OUT:
#   summary.txt       one line per phase when it ends: phase, status, seconds, limit, note
#   env.txt           GPU, driver, versions of python/torch/triton/nvcc/ninja/pytest..., the state of _C
#   <phase>.log       everything the phase printed (tee'd while it runs); <phase>.xml: pytest's JUnit XML
#   bench.json        the benchmark (rewritten atomically after every shape/depth), bench.md its tables
# Exit status: 0 when every phase ran clean, 1 otherwise (every phase still runs), 2 when there is no GPU
# or the script is not in an ffkernels checkout. Installs nothing.
set -uo pipefail

BOUNDS="preflight=25 build=198 tests-cuda=62 tests-triton=35 bench=95 tests-gpu-cuda=52 tests-gpu-triton=63 report=10"
TOTAL_LIMIT=540   # the sum of BOUNDS may not exceed this (checked by tests/test_bench.py)
GRACE=5           # seconds between SIGINT and SIGKILL at the end of a phase (inside its bound; a quarter of
                  # the bound at most)

PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"  # python3 where no python
# Python with a SIGINT handler that raises KeyboardInterrupt once (even where the caller ignores SIGINT, as a
# non-interactive shell does for background jobs) and ignores any repeat (`timeout` signals the command and
# then its process group): pytest prints its summary, the bench saves its results. Then runs the module
# named first, like `python -m`.
PY_INT='import runpy, signal, sys
def _on_int(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt
signal.signal(signal.SIGINT, _on_int)
mod = sys.argv.pop(1)
sys.argv[0] = mod
runpy.run_module(mod, run_name="__main__", alter_sys=True)'

# preflight: whether there is a GPU and _C must be rebuilt (preflight.env, written first), then what the machine
# has (env.txt, written line by line)
PREFLIGHT_PY='import importlib.metadata as md, os, platform, shlex, subprocess, sys
out = sys.argv[1]
open(os.path.join(out, "env.txt"), "w").close()
def say(k, v):
    print(f"{k}: {v}", flush=True)
    with open(os.path.join(out, "env.txt"), "a") as f:
        f.write(f"{k}: {v}\n")
def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=8)
        return (p.stdout + p.stderr).strip()
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {e})"
say("python", f"{platform.python_version()} ({sys.executable})")
import torch
env = {"GPU_OK": "0", "GPU_ARCH": "", "BUILD_REASON": ""}
if torch.cuda.is_available():
    cap = "%d.%d" % torch.cuda.get_device_capability(0)
    env.update(GPU_OK="1", GPU_ARCH=cap)
    say("GPU", f"{torch.cuda.get_device_name(0)}, compute capability {cap}, "
        f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    try:
        from ffkernels.bench.machine import extension_rebuild_reason
        from ffkernels.backends import compiled
        env["BUILD_REASON"] = extension_rebuild_reason(cap) or ""
        say("ffkernels._C", f"loaded {compiled.loaded()}, with CUDA {compiled.built_with_cuda()}, "
            f"archs {compiled.cuda_archs()!r}: " + (env["BUILD_REASON"] or "up to date"))
    except Exception as e:
        env["BUILD_REASON"] = f"importing ffkernels failed ({type(e).__name__}: {e})"
        say("ffkernels", env["BUILD_REASON"])
else:
    say("GPU", "none: torch.cuda.is_available() is False")
with open(os.path.join(out, "preflight.env"), "w") as f:
    f.write("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
from torch.utils import cpp_extension
say("torch", f"{torch.__version__}, CUDA {torch.version.cuda}; ninja for extensions: "
    f"{cpp_extension.is_ninja_available()}; CUDA_HOME {cpp_extension.CUDA_HOME}")
say("cpus", os.cpu_count())
for pkg in ("triton", "numpy", "pytest", "setuptools", "ninja", "scipy", "scikit-learn", "mlxtend",
            "matplotlib", "tqdm", "threadpoolctl"):
    try:
        say(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        say(pkg, "not installed")
say("nvcc", (run(["nvcc", "--version"]).splitlines() or ["?"])[-1])
say("ninja binary", run(["ninja", "--version"]))
say("nvidia-smi", "\n  " + run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                  "power.limit", "--format=csv"]).replace("\n", "\n  "))'

BUILD_CHECK_PY='import sys, ffkernels
from ffkernels.backends import compiled
from ffkernels.bench.machine import extension_rebuild_reason
reason = extension_rebuild_reason(sys.argv[1]) if sys.argv[1] else None
print("ffkernels._C after the build: loaded", compiled.loaded(), "| with CUDA", compiled.built_with_cuda(),
      "| archs", repr(compiled.cuda_archs()), "| backends", ffkernels.available_backends())
if reason:
    print("gpu_check.sh: the build did not give this GPU CUDA kernels:", reason, file=sys.stderr)
sys.exit(1 if reason else 0)'

say() { printf '\n== %s\n' "$*"; }

# the pytest arguments of each test phase (the runs below and --plan use the same ones)
TESTS_CUDA_ARGS=(tests/test_build.py::test_cuda_build_when_expected
                 tests/test_build.py::test_every_op_has_kernels_for_the_devices_it_was_built_for tests/test_cuda_gpu.py)
TESTS_TRITON_ARGS=(tests/test_triton_gpu.py)
TESTS_GPU_CUDA_ARGS=(--gpu-smoke -m "gpu and not triton" --ignore=tests/test_cuda_gpu.py tests/)
# the Triton conv step's GPU cases (tests/test_conv_triton.py: ~24 new JIT specializations) do not fit this phase's
# budget (it is full without them); they run with --full, or `python -m pytest -m gpu tests/test_conv_triton.py`;
# so do the triton cases of torch.autocast (tests/test_autocast.py: ~16 more in the smoke selection, their bf16 kernel
# variants; --plan put the phase at ~74 s of 63 s with them)
TESTS_GPU_TRITON_ARGS=(--gpu-smoke -m "gpu and triton" --ignore=tests/test_triton_gpu.py
                       --ignore=tests/test_conv_triton.py --ignore=tests/test_autocast.py tests/)
FULL_GPU_ARGS=(-m gpu tests/)

phase_bound() { local p; for p in $BOUNDS; do if [ "${p%%=*}" = "$1" ]; then echo "${p#*=}"; return; fi; done; }

bounds_total() { local p t=0; for p in $BOUNDS; do t=$((t + ${p#*=})); done; echo "$t"; }

# seconds from the start of the run by which phase $1 must end (its budget plus those of the phases before it)
phase_deadline() {
  local p t=0
  for p in $BOUNDS; do
    t=$((t + ${p#*=}))
    if [ "${p%%=*}" = "$1" ]; then echo "$t"; return 0; fi
  done
  echo "gpu_check.sh: no phase $1 in BOUNDS" >&2
  return 1
}

print_plan() {
  local p
  echo "gpu_check.sh phases (budget in s; a phase may also use what earlier ones left):"
  for p in $BOUNDS; do printf '  %-18s %4s\n' "${p%%=*}" "${p#*=}"; done
  printf '  %-18s %4s (limit %s; SIGINT, then SIGKILL %ss later, inside each bound)\n' total "$(bounds_total)" \
    "$TOTAL_LIMIT" "$GRACE"
}

# the test phases' case counts (collected as on a GPU) and estimated times (scripts/gpu_plan.py); status 1 when an
# estimate is over its budget
print_test_plan() {
  local rc=0
  echo "test phases: cases (pytest --collect-only, parametrized as on a GPU) and estimated time (scripts/gpu_plan.py):"
  "$PYTHON" scripts/gpu_plan.py tests-cuda "$(phase_bound tests-cuda)" "${TESTS_CUDA_ARGS[@]}" || rc=1
  "$PYTHON" scripts/gpu_plan.py tests-triton "$(phase_bound tests-triton)" "${TESTS_TRITON_ARGS[@]}" || rc=1
  "$PYTHON" scripts/gpu_plan.py tests-gpu-cuda "$(phase_bound tests-gpu-cuda)" "${TESTS_GPU_CUDA_ARGS[@]}" || rc=1
  "$PYTHON" scripts/gpu_plan.py tests-gpu-triton "$(phase_bound tests-gpu-triton)" "${TESTS_GPU_TRITON_ARGS[@]}" || rc=1
  echo "--full (no budget):"
  "$PYTHON" scripts/gpu_plan.py full-gpu 100000 "${FULL_GPU_ARGS[@]}" || true
  return "$rc"
}

# record PHASE STATUS SECONDS LIMIT NOTE: one line of summary.txt (and the run's status)
record() {
  printf '%-18s %-10s %5ss  limit %4ss  %s\n' "$1" "$2" "$3" "$4" "$5" | tee -a "$OUT/summary.txt"
  case "$2" in ok|skipped) ;; *) STATUS=1 ;; esac
}

# run_phase PHASE CMD...: CMD bounded by the phase's deadline (SIGINT at the bound minus the grace, SIGKILL at the
# bound), its output tee'd into $OUT/PHASE.log as it goes; the outcome appended to summary.txt
run_phase() {
  local name="$1"; shift
  local deadline now limit kill_after soft start rc st note=""
  deadline=$(phase_deadline "$name") || { record "$name" error 0 0 "not in BOUNDS"; return 1; }
  now=$(date +%s)
  limit=$((T0 + deadline - now))
  if [ "$limit" -lt 2 ]; then
    record "$name" "no-time" 0 "$limit" "the run's time was used up before this phase"
    return 1
  fi
  kill_after=$GRACE
  if [ $((4 * kill_after)) -gt "$limit" ]; then kill_after=$((limit / 4)); fi
  if [ "$kill_after" -lt 1 ]; then kill_after=1; fi
  soft=$((limit - kill_after))
  say "$name (bound ${limit} s: SIGINT after ${soft} s, SIGKILL ${kill_after} s later) $(date -u +%H:%M:%S)"
  start=$(date +%s)
  timeout -s INT -k "$kill_after" "$soft" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) st=ok ;;
    124) st=timeout; note="stopped by SIGINT at its bound" ;;
    137) st=killed; note="SIGKILL: it did not stop ${kill_after} s after SIGINT" ;;
    *) st=failed; note="exit status $rc" ;;
  esac
  record "$name" "$st" "$(($(date +%s) - start))" "$limit" "$note"
  [ "$rc" -eq 0 ]
}

pytest_phase() {  # pytest_phase PHASE [env VAR=...] PYTEST-ARGS...: one pytest run as a phase
  local name="$1"; shift
  local envs=()
  while [ $# -gt 0 ] && [[ "$1" == *=* ]]; do envs+=("$1"); shift; done
  run_phase "$name" env ${envs[@]+"${envs[@]}"} "$PYTHON" -c "$PY_INT" pytest -v -rA --tb=short --maxfail=100 \
    --durations=10 -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT/$name.xml" "$@"
}

# --full: every GPU case (pytest -m gpu), not bounded by BOUNDS: for a session with more device time. The extension
# must already have CUDA kernels (run the bounded check first: it builds them). Exit status: pytest's.
full_suite() {
  local out="${OUT:-gpu_results}"
  mkdir -p "$out" || { echo "gpu_check.sh: cannot create $out" >&2; return 2; }
  out="$(cd "$out" && pwd)"
  cd "$(dirname "$0")/.." || return 2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  FFKERNELS_EXPECT_CUDA=1 "$PYTHON" -m pytest -q -rfE --durations=30 -p no:cacheprovider \
    --junitxml="$out/full-gpu.xml" "${FULL_GPU_ARGS[@]}" 2>&1 | tee "$out/full-gpu.log"
  return "${PIPESTATUS[0]}"
}

main() {
  case "${1:-}" in
    "") ;;
    --plan) print_plan; cd "$(dirname "$0")/.." || exit 2; print_test_plan; exit $? ;;
    --full) full_suite; exit $? ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  local out="${OUT:-gpu_results}"
  mkdir -p "$out" || { echo "gpu_check.sh: cannot create $out" >&2; exit 2; }
  OUT="$(cd "$out" && pwd)"
  cd "$(dirname "$0")/.." || exit 2
  if [ ! -f setup.py ] || [ ! -d ffkernels ]; then
    echo "gpu_check.sh: $(pwd) is not an ffkernels checkout (no setup.py / ffkernels/)" >&2
    exit 2
  fi
  if ! command -v timeout >/dev/null; then
    echo "gpu_check.sh: needs coreutils' timeout to bound its phases" >&2
    exit 2
  fi
  if [ "$(bounds_total)" -gt "$TOTAL_LIMIT" ]; then
    echo "gpu_check.sh: the phase budgets add up to $(bounds_total) s, over $TOTAL_LIMIT s" >&2
    exit 2
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  STATUS=0
  T0=$(date +%s)
  printf 'gpu_check.sh %s, budget %s s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(bounds_total)" "$BOUNDS" \
    >"$OUT/summary.txt"
  print_plan

  rm -f "$OUT/preflight.env"
  run_phase preflight "$PYTHON" -c "$PREFLIGHT_PY" "$OUT"
  GPU_OK="" GPU_ARCH="" BUILD_REASON="could not tell (the preflight did not finish)"
  # shellcheck disable=SC1091
  [ -f "$OUT/preflight.env" ] && . "$OUT/preflight.env"
  if [ "$GPU_OK" = "0" ]; then
    echo "gpu_check.sh: torch sees no CUDA GPU (torch.cuda.is_available() is False): nothing to check here" >&2
    record stop no-gpu 0 0 "torch.cuda.is_available() is False"
    exit 2
  fi

  if [ -n "$BUILD_REASON" ]; then
    echo "rebuilding ffkernels._C: $BUILD_REASON" | tee -a "$OUT/build.log"
    run_phase build env FFKERNELS_CUDA=1 ${GPU_ARCH:+TORCH_CUDA_ARCH_LIST="$GPU_ARCH"} \
      MAX_JOBS="$(nproc 2>/dev/null || echo 4)" \
      bash -c '"$1" setup.py build_ext --inplace && "$1" -c "$2" "$3"' build "$PYTHON" "$BUILD_CHECK_PY" "$GPU_ARCH"
  else
    record build skipped 0 0 "ffkernels._C already has CUDA kernels for this GPU's arch $GPU_ARCH"
  fi

  pytest_phase tests-cuda FFKERNELS_EXPECT_CUDA=1 "${TESTS_CUDA_ARGS[@]}"
  pytest_phase tests-triton "${TESTS_TRITON_ARGS[@]}"
  run_phase bench "$PYTHON" -c "$PY_INT" ffkernels bench --device cuda --dtype bfloat16,float32 --precision bf16 \
    --no-progress \
    --repeats 5 --warmup 3 --min-time 0.03 --json "$OUT/bench.json" --markdown "$OUT/bench.md"
  pytest_phase tests-gpu-cuda "${TESTS_GPU_CUDA_ARGS[@]}"
  pytest_phase tests-gpu-triton "${TESTS_GPU_TRITON_ARGS[@]}"
  run_phase report "$PYTHON" -c "$PY_INT" ffkernels bench --from-json "$OUT/bench.json" \
    --markdown "$OUT/bench.md" --plot "$OUT/bench.png"

  say "summary ($OUT/summary.txt), $(($(date +%s) - T0)) s in all, exit status $STATUS"
  cat "$OUT/summary.txt"
  exit "$STATUS"
}

# sourced (the tests do, to exercise the phase runner): define the functions only
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
