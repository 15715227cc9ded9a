"""The conv layer benchmark (``ffkernels bench --conv``): every conv case on every conv shape, and the ratios.

As the linear one (layer.py): a shape's cases are timed together with interleaved repeats, ratios use median times,
every case processes the same B real images per call (FF hinton as B positives + B negatives, FF competitive and BP
as B images), so ``ff_bp_dx_ratio_per_sample`` = (t_FF / B) / (t_BP-dx / B). ``ratio_to_floor`` is to ``floor``
(the fp32 cases) or ``floor-bf16`` (the autocast cases). A case that fails gets a row with ``error`` and no time.
"""
from __future__ import annotations

from .conv_cases import REFERENCE, ConvShape, conv_layer_cases
from .layer import _median, _ratio, bench_plan, finish_row
from .timing import Timing


def derive_conv(shape: ConvShape, cases, times: dict, errors: "dict | None" = None, dtype: "str | None" = None) -> list:
    """One result row per case of ``shape``, from its Timing in ``times`` (keyed by case name), or its error in
    ``errors`` (then the row has ``error`` and None for every measure)."""
    errors = errors or {}
    t_floor, t_floor_bf16 = _median(times, "floor"), _median(times, "floor-bf16")
    t_ref, t_bp_dx = _median(times, REFERENCE.name), _median(times, "bp-dx")
    h_out, w_out = shape.output_hw
    rows = []
    for case in cases:
        t: "Timing | None" = times.get(case.name)
        median = t.median_s if t is not None else None
        row = {"shape": str(shape), "loss": shape.loss, "batch": shape.batch, "in_channels": shape.in_channels,
               "height": shape.height, "width": shape.width, "out_channels": shape.out_channels,
               "kernel": shape.kernel, "padding": shape.padding, "out_height": h_out, "out_width": w_out,
               "case": case.name, "kind": case.kind, "backend": case.backend}
        if dtype is not None:
            row["dtype"] = dtype
        row.update({
            "images": case.images(shape), "samples": shape.batch, "time": t.to_dict() if t is not None else None,
            "ms_per_sample": median * 1e3 / shape.batch if median else None,
            "samples_per_s": shape.batch / median if median else None,
            "ratio_to_floor": _ratio(median, t_floor_bf16 if case.precision == "bf16" else t_floor),
            "speedup_over_reference": _ratio(t_ref, median) if case.kind == "fused" else None,
            "ff_bp_dx_ratio_per_sample": _ratio(median, t_bp_dx) if case.kind in ("fused", "reference") else None,
        })
        rows.append(finish_row(row, case, times, errors))
    return rows


def bench_conv_layers(shapes, device, dtype, backends, *, warmup: int, repeats: int, min_time: float,
                      progress: bool = True, on_shape=None, bf16: bool = False) -> list:
    """Result rows (see ``derive_conv``) for every case of ``conv_layer_cases(backends)`` on every conv shape.
    ``on_shape(rows)``, when given, is called after every shape with the rows so far (to save them)."""
    cases = conv_layer_cases(backends, bf16=bf16)
    return bench_plan([(shape, cases) for shape in shapes], device, dtype, derive_conv, desc="conv layer steps",
                      warmup=warmup, repeats=repeats, min_time=min_time, progress=progress, on_shape=on_shape)
