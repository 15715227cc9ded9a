"""What a test run's passes are: kernel checks vs the rest, from pytest's JUnit XML (the README quotes it).

    python -m pytest -q --junitxml=/tmp/run.xml && python tools/test_counts.py /tmp/run.xml

A kernel check is a passed case parametrized over a kernel backend (its id starts with cpu, cuda or triton: the
behaviour tests' kernel cases, most of them against the float64 oracle) or a case of a kernel-only file
(test_cuda_gpu.py, test_triton_*.py, test_cpu_threads.py, test_conv_cpu.py, test_conv_gpu.py, test_conv_triton.py).
Everything else checks the API and plumbing (the reference backend, whose steps are the oracle's, included), the oracle
itself, the study, the CLI, the benchmark.
"""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

KERNEL_ID = re.compile(r"\[(cpu|cuda|triton)(-|\])")
KERNEL_FILES = re.compile(r"test_cuda_gpu|test_triton_|test_cpu_threads|test_conv_cpu|test_conv_gpu|test_conv_triton")


def counts(path: str) -> dict:
    out = {"kernel": 0, "other": 0, "skipped": 0, "failed": 0}
    for case in ET.parse(path).iter("testcase"):
        if case.find("skipped") is not None:
            out["skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            out["failed"] += 1
        elif KERNEL_ID.search(case.get("name", "")) or KERNEL_FILES.search(case.get("classname", "")):
            out["kernel"] += 1
        else:
            out["other"] += 1
    return out


if __name__ == "__main__":
    c = counts(sys.argv[1])
    print(f"{c['kernel'] + c['other']} passed: {c['kernel']} kernel checks, {c['other']} API/plumbing/oracle/study "
          f"checks; {c['skipped']} skipped, {c['failed']} failed")
