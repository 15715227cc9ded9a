"""The layer benchmark: every case on every shape, and the ratios between them.

The cases of a shape are timed together, their repeats interleaved (timing.measure_many), so load
that drifts during the run slows them alike. Ratios use median times. Every case processes the same
B real samples per call (FF as B positive + B negative rows, BP as B rows), so
``ff_bp_ratio_per_sample`` = (t_FF / B) / (t_BP / B).
``ratio_to_floor`` is always to the 2B-row floor of the FF step on the pair (the labeled first-layer
step, with B-row GEMMs, can go below 1).

A case that fails (its build or any call raises: CUDA out of memory, a Triton compile error, a missing
kernel) gets a row with ``error`` set and no time; the other cases of the shape are still measured, and
ratios to a failed case are None.
"""
from __future__ import annotations

from .cases import FLOOR, REFERENCE, LayerShape, layer_cases
from .progress import progress_bar
from .timing import Timing, describe_error, measure_many, release_memory

_DTYPE_NAMES = {"torch.float32": "float32", "torch.float64": "float64", "torch.bfloat16": "bfloat16",
                "torch.float16": "float16"}


def dtype_name(dtype) -> str:
    return _DTYPE_NAMES.get(str(dtype), str(dtype).replace("torch.", ""))


def _ratio(a, b):
    return a / b if a is not None and b else None


def _median(times: dict, name: str):
    t = times.get(name)
    return t.median_s if t is not None else None


def derive(shape: LayerShape, cases, times: dict, errors: "dict | None" = None, dtype: "str | None" = None) -> list:
    """One result row per case of ``shape``, from its Timing in ``times`` (keyed by case name), or its error in
    ``errors`` (then the row has ``error`` and None for every measure)."""
    errors = errors or {}
    t_floor, t_ref = _median(times, FLOOR.name), _median(times, REFERENCE.name)
    t_floor_bf16 = _median(times, "floor-bf16")
    t_bp, t_bp_dx = _median(times, "bp"), _median(times, "bp-dx")
    rows = []
    for case in cases:
        t: "Timing | None" = times.get(case.name)
        is_ff = case.kind in ("fused", "labeled", "reference")
        row = {"shape": str(shape), "batch": shape.batch, "in_features": shape.in_features,
               "out_features": shape.out_features, "case": case.name, "kind": case.kind, "backend": case.backend}
        if dtype is not None:
            row["dtype"] = dtype
        median = t.median_s if t is not None else None
        row.update({
            "gemm_rows": case.rows(shape), "samples": shape.batch, "time": t.to_dict() if t is not None else None,
            "ms_per_sample": median * 1e3 / shape.batch if median else None,
            "samples_per_s": shape.batch / median if median else None,
            "ratio_to_floor": _ratio(median, t_floor_bf16 if case.precision == "bf16" else t_floor),
            "speedup_over_reference": _ratio(t_ref, median) if case.kind in ("fused", "labeled") else None,
            "ff_bp_ratio_per_sample": _ratio(median, t_bp) if is_ff else None,
            "ff_bp_dx_ratio_per_sample": _ratio(median, t_bp_dx) if is_ff else None,
        })
        rows.append(finish_row(row, case, times, errors))
    return rows


def finish_row(row: dict, case, times: dict, errors: dict) -> dict:
    """What every layer case's row (linear or conv) ends with: for an autocast case its precision and speed-up over
    its fp32 case, and for an unmeasured case its error."""
    median = _median(times, case.name)
    if case.precision != "fp32":  # the autocast cases: their precision and speed-up over the fp32 case
        fp32_name = case.name[: -len("-" + case.precision)]
        row["precision"] = case.precision
        if case.kind != "floor":  # floor-bf16 also holds the optimizer's pass: no fp32 counterpart
            row["speedup_over_fp32"] = _ratio(_median(times, fp32_name), median)
    if times.get(case.name) is None:
        row["error"] = errors.get(case.name, "not measured")
    return row


def bench_layers(shapes, device, dtype, backends, *, warmup: int, repeats: int, min_time: float,
                 progress: bool = True, on_shape=None, bf16: bool = False) -> list:
    """Result rows (see ``derive``) for every case in ``layer_cases(backends)`` that applies, on every shape.

    ``on_shape(rows)``, when given, is called after every shape with the rows so far (to save them)."""
    cases = layer_cases(backends, bf16=True) if bf16 else layer_cases(backends)
    plan = [(shape, [c for c in cases if c.applies_to(shape)]) for shape in shapes]
    return bench_plan(plan, device, dtype, derive, desc="layer steps", warmup=warmup, repeats=repeats,
                      min_time=min_time, progress=progress, on_shape=on_shape)


def bench_plan(plan, device, dtype, derive_rows, *, desc: str, warmup: int, repeats: int, min_time: float,
               progress: bool = True, on_shape=None) -> list:
    """Time the cases of every (shape, cases) of ``plan`` (a shape's cases together, their repeats interleaved) and
    return ``derive_rows(shape, cases, times, errors, dtype name)`` of every shape, in order. A case whose build
    raises gets its error recorded; ``on_shape(rows)`` is called after every shape with the rows so far."""
    name = dtype_name(dtype)
    rows = []
    with progress_bar(total=sum(len(cs) for _, cs in plan), desc=f"{desc} {name}", enabled=progress) as bar:
        for shape, shape_cases in plan:
            steps, errors = {}, {}
            for case in shape_cases:
                bar.set_postfix_str(f"{shape} building {case.name}")
                try:
                    steps[case.name] = case.build(shape, device, dtype)
                except Exception as e:  # noqa: BLE001 (recorded in its row; the other cases go on)
                    errors[case.name] = describe_error(e)
                    release_memory(device)
            bar.set_postfix_str(f"{shape} timing")
            times = measure_many(steps, device, warmup=warmup, repeats=repeats, min_time=min_time, errors=errors)
            del steps
            release_memory(device)
            bar.update(len(shape_cases))
            rows.extend(derive_rows(shape, shape_cases, times, errors, name))
            if on_shape is not None:
                on_shape(rows)
    return rows
