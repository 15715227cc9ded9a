"""The layer benchmark: every case on every shape, and the ratios between them.

The cases of a shape are timed together, their repeats interleaved (timing.measure_many), so load
that drifts during the run slows them alike. Ratios use median times. Every case processes the same
B real samples per call (FF as B positive + B negative rows, BP as B rows), so
``ff_bp_ratio_per_sample`` = (t_FF / B) / (t_BP / B).
``ratio_to_floor`` is always to the 2B-row floor of the FF step on the pair (the labeled first-layer
step, with B-row GEMMs, can go below 1).
"""
from __future__ import annotations

from .cases import FLOOR, REFERENCE, LayerShape, layer_cases
from .progress import progress_bar
from .timing import Timing, measure_many


def _ratio(a: float, b: float):
    return a / b if b > 0 else None


def derive(shape: LayerShape, cases, times: dict) -> list:
    """One result row per case of ``shape``, from its Timing in ``times`` (keyed by case name)."""
    t_floor = times[FLOOR.name].median_s
    t_ref = times[REFERENCE.name].median_s
    t_bp, t_bp_dx = times["bp"].median_s, times["bp-dx"].median_s
    rows = []
    for case in cases:
        t: Timing = times[case.name]
        is_ff = case.kind in ("fused", "labeled", "reference")
        rows.append({
            "shape": str(shape), "batch": shape.batch, "in_features": shape.in_features,
            "out_features": shape.out_features, "case": case.name, "kind": case.kind, "backend": case.backend,
            "gemm_rows": case.rows(shape), "samples": shape.batch, "time": t.to_dict(),
            "ms_per_sample": t.median_s * 1e3 / shape.batch,
            "samples_per_s": shape.batch / t.median_s,
            "ratio_to_floor": _ratio(t.median_s, t_floor),
            "speedup_over_reference": _ratio(t_ref, t.median_s) if case.kind in ("fused", "labeled") else None,
            "ff_bp_ratio_per_sample": _ratio(t.median_s, t_bp) if is_ff else None,
            "ff_bp_dx_ratio_per_sample": _ratio(t.median_s, t_bp_dx) if is_ff else None,
        })
    return rows


def bench_layers(shapes, device, dtype, backends, *, warmup: int, repeats: int, min_time: float,
                 progress: bool = True) -> list:
    """Result rows (see ``derive``) for every case in ``layer_cases(backends)`` that applies, on every shape."""
    cases = layer_cases(backends)
    plan = [(shape, [c for c in cases if c.applies_to(shape)]) for shape in shapes]
    rows = []
    with progress_bar(total=sum(len(cs) for _, cs in plan), desc="layer steps", enabled=progress) as bar:
        for shape, shape_cases in plan:
            steps = {}
            for case in shape_cases:
                bar.set_postfix_str(f"{shape} building {case.name}")
                steps[case.name] = case.build(shape, device, dtype)
            bar.set_postfix_str(f"{shape} timing")
            times = measure_many(steps, device, warmup=warmup, repeats=repeats, min_time=min_time)
            del steps
            bar.update(len(shape_cases))
            rows.extend(derive(shape, shape_cases, times))
    return rows
