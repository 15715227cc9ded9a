#!/usr/bin/env bash
# The GPU check of ffkernels, in one go (meant to finish in under 8 minutes on an H100, build included;
# not yet timed on one):
#   1. builds ffkernels._C in place with the CUDA kernels when it is missing or was built without them
#      (for this GPU's arch only, unless TORCH_CUDA_ARCH_LIST is set)
#   2. runs the GPU tests: the build tests of tests/test_build.py, then every test marked `gpu`
#   3. runs the GPU benchmark (benchmarks/gpu_bench.py)
# Run it from the repository root on a machine with a CUDA GPU, torch and a CUDA toolkit (nvcc); it
# installs nothing. Everything it prints is also written to ${OUT:-gpu_results}/:
#   build.log, pytest_gpu.log, pytest_gpu.xml, gpu_bench.json, gpu_bench.md
# Exit status: 0 when the tests and the benchmark ran clean, 1 otherwise (every phase still runs).
set -uo pipefail

OUT="${OUT:-gpu_results}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

say() { printf '\n== %s\n' "$*"; }
# `timeout` bounds each phase so that a hang cannot eat the session; absent on some systems
bounded() { local s="$1"; shift; if command -v timeout >/dev/null; then timeout "$s" "$@"; else "$@"; fi; }

if [ ! -f setup.py ] || [ ! -d ffkernels ]; then
  echo "gpu_check.sh: run me from the ffkernels repository root" >&2
  exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA GPU (torch.cuda.is_available() is False)" >&2
  exit 2
fi

say "1/3 ffkernels._C with CUDA kernels"
if ! "$PYTHON" -c "import sys, ffkernels.backends.compiled as e; sys.exit(0 if e.built_with_cuda() else 1)" 2>/dev/null; then
  archs="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
  jobs="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
  echo "building in place: FFKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=$archs MAX_JOBS=$jobs (log: $OUT/build.log)"
  start=$(date +%s)
  if ! FFKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$archs" MAX_JOBS="$jobs" \
       bounded 480 "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"
    echo "gpu_check.sh: the CUDA build failed (full log: $OUT/build.log); is a CUDA toolkit installed (CUDA_HOME)?" >&2
    exit 1
  fi
  echo "built in $(( $(date +%s) - start )) s"
fi
"$PYTHON" -c "
import torch, ffkernels, ffkernels.backends.compiled as e
print('ffkernels', ffkernels.__file__)
print('built with CUDA:', e.built_with_cuda(), '| archs:', e.cuda_archs(), '| backends:', ffkernels.available_backends())
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)
" | tee "$OUT/build_info.txt"

say "2/3 GPU tests"
# FFKERNELS_EXPECT_CUDA=1: a build without CUDA kernels fails the build test instead of skipping it
FFKERNELS_EXPECT_CUDA=1 bounded 120 "$PYTHON" -m pytest -q -rs \
  "tests/test_build.py::test_cuda_build_when_expected" \
  "tests/test_build.py::test_every_op_has_kernels_for_the_devices_it_was_built_for" 2>&1 | tee "$OUT/pytest_build.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# not -x: one run on a GPU should report every failure (bounded, so a broken build stays readable)
bounded 300 "$PYTHON" -m pytest -q --maxfail=25 -m gpu tests/ --junitxml="$OUT/pytest_gpu.xml" 2>&1 | tee "$OUT/pytest_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

say "3/3 GPU benchmark"
bounded 300 "$PYTHON" benchmarks/gpu_bench.py --out "$OUT" || status=1

say "results in $OUT/ (exit status $status)"
exit "$status"
