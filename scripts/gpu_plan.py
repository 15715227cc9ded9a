"""How many cases a pytest phase of scripts/gpu_check.sh runs on a GPU, and about how long it takes: counted, not
typed (``gpu_check.sh --plan`` calls it for each test phase).

    python scripts/gpu_plan.py NAME BUDGET_S [PYTEST ARGS...]
    -> "NAME  <cases> cases  ~<estimate> s of <budget> s" (and exit status 1 when the estimate is over the budget)

The count: ``pytest --collect-only -q`` with the phase's own arguments (its marker expression, ``--gpu-smoke``, its
files) and FFKERNELS_COLLECT_AS_GPU=1, which parametrizes the tests as on a GPU machine (cuda and triton cases on
the device "cuda"), so the count is the GPU machine's on any machine.

The estimate, per case (no GPU has run these tests yet, so these are derived from CPU runs and assumptions):

- every case: the mean wall time of the cpu backend's cases of the same test function, measured on the development
  machine (scripts/gpu_case_times.json: the C++ kernels, the float64 oracle and the Python around them). The test
  shapes are tiny, so on a GPU a case is bound by Python and kernel launches, as on 2 busy CPU cores; taken as the
  GPU case's time. DEFAULT_CASE_S where the function has no cpu cases (Triton-only and GPU-only tests).
- a Triton case that launches kernels: plus TRITON_COMPILE_S for its JIT compiles. An assumption: Triton compiles
  each kernel once per specialization (dtype, constexpr options, alignment) and caches it for the process and on
  disk; a smoke case mostly meets a new specialization of its 3-4 kernels, and one compile takes a fraction of a
  second on an H100 host. Argument-check cases (NO_LAUNCH) launch nothing.
- the phase: plus STARTUP_S (python, torch and CUDA initialization, the collection).
The interpreter's per-case times (``TRITON_INTERPRET=1 python -m pytest -m triton --durations``) are not used: the
interpreter runs each program in numpy and compiles nothing, so it says nothing about a GPU's time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMES = os.path.join(ROOT, "scripts", "gpu_case_times.json")
DEFAULT_CASE_S = 0.3
TRITON_COMPILE_S = 0.5   # [assumed] JIT compiles of a Triton case's kernels on a GPU host
STARTUP_S = 12.0         # [assumed] interpreter start, torch and CUDA initialization, collection
NO_LAUNCH = ("test_bad_op_arguments.py", "test_bad_input.py",
             "test_opcheck.py::test_samples_follow_the_registered_schemas",
             "test_opcheck.py::test_every_registered_op_has_samples", "test_triton_split.py::test_row_split_rule",
             "test_peer_norm.py::test_functional_api_and_backends_check_peer_mean",
             "test_peer_norm.py::test_ff_update_refuses_peer_norm")


def collect(args) -> list:
    env = {**os.environ, "FFKERNELS_COLLECT_AS_GPU": "1"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    ids = [line.strip() for line in p.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if p.returncode not in (0, 5):
        raise SystemExit(f"gpu_plan.py: collecting {args} failed (exit {p.returncode}):\n{p.stdout[-2000:]}"
                         f"{p.stderr[-2000:]}")
    return ids


def case_seconds(node_id: str, times: dict) -> float:
    path, _, rest = node_id.partition("::")
    func = f"{os.path.basename(path)}::{rest.split('[')[0]}"
    t = times.get(func, DEFAULT_CASE_S)
    launches = not (func.split("::")[0] in NO_LAUNCH or func in NO_LAUNCH)
    triton = "triton" in node_id.split("[")[-1] or "triton" in os.path.basename(path)
    return t + (TRITON_COMPILE_S if triton and launches else 0.0)


def plan(name: str, budget: float, args) -> tuple:
    with open(TIMES) as f:
        times = json.load(f)["seconds"]
    ids = collect(args)
    estimate = STARTUP_S + sum(case_seconds(i, times) for i in ids)
    return len(ids), estimate


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, budget, args = argv[0], float(argv[1]), argv[2:]
    n, est = plan(name, budget, args)
    fits = est <= budget
    print(f"  {name:<18s} {n:5d} cases  ~{est:4.0f} s of {budget:.0f} s" + ("" if fits else "  OVER BUDGET"))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
