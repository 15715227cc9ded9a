#!/usr/bin/env bash
# Check this tree against another Python / torch / Triton stack (e.g. the GPU machine's torch 2.11 + triton 3.6)
# without touching the checkout's own ffkernels/_C*.so:
#
#   scripts/compat_check.sh /path/to/python [scratch-dir]
#
# 1. copies the tree (tracked and untracked-but-not-ignored files) into a scratch folder (default: a new temp dir;
#    pass the same one again to reuse its build: object files are kept per Python/torch version),
# 2. builds ffkernels._C there with that python (FFKERNELS_CUDA=0 and MAX_JOBS=1 unless set),
# 3. runs a CPU subset of the tests (COMPAT_TESTS to change it) and the Triton cases under the interpreter
#    (TRITON_INTERPRET=1 ... -m triton; skipped when that python has no triton),
# 4. prints the versions and one summary line per run. Exit status: non-zero when a run failed.
set -u
PY=${1:-python}
SCRATCH=${2:-$(mktemp -d /tmp/ffkernels-compat.XXXXXX)}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TESTS=${COMPAT_TESTS:-"tests/test_build.py tests/test_layers.py tests/test_labeled.py tests/test_non_finite.py \
tests/test_host_syncs.py tests/test_head.py tests/test_peer_norm.py tests/test_bad_op_arguments.py \
tests/test_opcheck.py tests/test_triton_launch.py tests/test_triton_math_and_settings.py tests/test_triton_ptxas.py"}

"$PY" - <<'EOF' || { echo "compat_check: $PY cannot import torch" >&2; exit 2; }
import importlib, sys
import torch
parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
for name in ("triton", "numpy"):
    try:
        parts.append(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        parts.append(f"{name} missing")
print("compat_check:", ", ".join(parts))
EOF

mkdir -p "$SCRATCH"
echo "compat_check: scratch copy in $SCRATCH"
(cd "$HERE" && git ls-files -co --exclude-standard -z | grep -zv '^ffkernels/_C' | tar --null -cf - -T -) \
    | tar -xf - -C "$SCRATCH" || exit 2
rm -f "$SCRATCH"/ffkernels/_C*.so

cd "$SCRATCH" || exit 2
echo "compat_check: building ffkernels._C (log: $SCRATCH/build.log)"
if ! FFKERNELS_CUDA=${FFKERNELS_CUDA:-0} MAX_JOBS=${MAX_JOBS:-1} "$PY" setup.py build_ext --inplace \
        >"$SCRATCH/build.log" 2>&1; then
    tail -20 "$SCRATCH/build.log"
    echo "compat_check: BUILD FAILED"
    exit 1
fi

status=0
summary=()
run() {  # name, then the command
    local name=$1; shift
    echo "compat_check: $name: $*"
    "$@" 2>&1 | tee "$SCRATCH/$name.log" | tail -5
    local rc=${PIPESTATUS[0]}
    local last
    last=$(grep -E '[0-9]+ (passed|failed|error)' "$SCRATCH/$name.log" | tail -1)
    summary+=("$name: ${last:-no pytest summary} (exit $rc)")
    # 5: nothing collected (e.g. no triton cases) is not a failure
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=1; fi
}

# shellcheck disable=SC2086
run cpu env PYTHONPATH="$SCRATCH" "$PY" -m pytest -q -p no:cacheprovider $TESTS
if "$PY" -c "import triton" 2>/dev/null; then
    run interpreter env PYTHONPATH="$SCRATCH" TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider -m triton
else
    summary+=("interpreter: skipped (no triton for $PY)")
fi

echo "compat_check: summary"
for line in "${summary[@]}"; do echo "  $line"; done
exit $status
