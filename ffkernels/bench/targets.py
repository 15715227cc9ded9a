"""The performance targets of issue 12, evaluated on a benchmark result: reported as met, not met or not
measured, never asserted (a benchmark is not a test).

1. ``floor``: at the shape 4096x2000x2000 (B = 4096 real samples: 4096 pos + 4096 neg = 8192 rows,
   2000 -> 2000) in bfloat16, every fused step (``fused-<backend>``) takes at most 1.3x the time of the GEMM
   floor (``floor``: the two GEMMs no FF step can avoid) of the same run.
2. ``memory``: FF's peak training memory is flat in depth where BP's grows. Both must grow by what the model
   keeps (the weights and the optimizer state of every added layer), so the target is read on what training
   needs *beyond* that: ``transient`` = peak (allocator level) - persistent (parameters + optimizer state,
   + gradients for BP), its growth per added layer by least squares over the depths of the run. Met when BP's
   grows (slope > 0) and FF's slope is at most FLAT_FRACTION of BP's. [This reading of "flat" is ours.]
"""
from __future__ import annotations

from .network import _linear_slope, row_dtype

TARGET_SHAPE = "4096x2000x2000"
TARGET_DTYPE = "bfloat16"
FLOOR_RATIO = 1.3
FLAT_FRACTION = 0.1  # FF's transient growth per layer at most this fraction of BP's counts as flat

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"
MiB = 2 ** 20


def _layer_rows(result: dict) -> list:
    layer = result.get("layer") or {}
    default = (result.get("settings") or {}).get("dtype", "float32")
    return [{**r, "dtype": r.get("dtype", default)} for r in layer.get("rows", [])]


def floor_targets(result: dict) -> list:
    """One entry per fused backend measured (or attempted) at TARGET_SHAPE in TARGET_DTYPE; one 'not measured'
    entry when there is none."""
    name = f"fused step <= {FLOOR_RATIO}x the GEMM floor at {TARGET_SHAPE} {TARGET_DTYPE}"
    rows = [r for r in _layer_rows(result) if r["shape"] == TARGET_SHAPE and r["dtype"] == TARGET_DTYPE]
    if not rows:
        return [{"target": "floor", "name": name, "case": None, "status": NOT_MEASURED, "value": None,
                 "detail": f"this run has no {TARGET_SHAPE} {TARGET_DTYPE} layer step"}]
    floor = next((r for r in rows if r["case"] == "floor"), None)
    fused = [r for r in rows if r["kind"] == "fused"]
    if not fused:
        return [{"target": "floor", "name": name, "case": None, "status": NOT_MEASURED, "value": None,
                 "detail": "no fused backend ran at this shape and dtype"}]
    out = []
    for r in fused:
        entry = {"target": "floor", "name": name, "case": r["case"], "status": NOT_MEASURED, "value": None}
        if r.get("error"):
            entry["detail"] = f"{r['case']} failed: {r['error']}"
        elif floor is None or floor.get("error") or r.get("ratio_to_floor") is None:
            entry["detail"] = f"the floor was not measured ({(floor or {}).get('error', 'no floor case')})"
        else:
            ratio = r["ratio_to_floor"]
            entry.update(status=MET if ratio <= FLOOR_RATIO else NOT_MET, value=ratio,
                         detail=f"{r['case']}: {r['time']['median_ms']:.3f} ms = {ratio:.2f}x the floor "
                                f"({floor['time']['median_ms']:.3f} ms)")
        out.append(entry)
    return out


def memory_targets(result: dict) -> list:
    """One entry per dtype of the network part (FF = the ``ff`` algo, the plain FF step of every layer)."""
    name = "FF peak memory flat in depth where BP's grows (beyond parameters + optimizer state)"
    net = result.get("network")
    if not net or not net.get("rows"):
        return [{"target": "memory", "name": name, "dtype": None, "status": NOT_MEASURED, "value": None,
                 "detail": "this run has no network part"}]
    default = (result.get("settings") or {}).get("dtype", "float32")
    out = []
    for dt in dict.fromkeys(row_dtype(r, default) for r in net["rows"]):
        entry = {"target": "memory", "name": name, "dtype": dt, "status": NOT_MEASURED, "value": None}
        slopes = {}
        for algo in ("ff", "bp"):
            pts = [(r["depth"], r["peak_alloc_bytes"] - r["persistent_bytes"]) for r in net["rows"]
                   if row_dtype(r, default) == dt and r["algo"] == algo and not r.get("error")
                   and r.get("peak_alloc_bytes") is not None and r.get("persistent_bytes") is not None]
            slopes[algo] = _linear_slope([p[0] for p in pts], [p[1] for p in pts]) if pts else None
        if slopes["ff"] is None or slopes["bp"] is None:
            entry["detail"] = "needs FF and BP memory at two depths or more"
        else:
            ff, bp = slopes["ff"], slopes["bp"]
            flat = bp > 0 and ff <= FLAT_FRACTION * bp
            entry.update(status=MET if flat else NOT_MET, value={"ff_bytes_per_layer": ff, "bp_bytes_per_layer": bp},
                         detail=f"{dt}: beyond parameters + optimizer state, FF grows {ff / MiB:.2f} MiB per added "
                                f"layer, BP {bp / MiB:.2f} MiB (flat: FF <= {FLAT_FRACTION:g} x BP, BP > 0)")
        out.append(entry)
    return out


def evaluate(result: dict) -> list:
    """Every target's entries: {"target", "name", "status" (met / not met / not measured), "value", "detail"}."""
    return floor_targets(result) + memory_targets(result)


def lines(result: dict) -> list:
    """The targets for people, one line each."""
    return [f"{t['status'].upper():>12}  {t['name']}: {t['detail']}" for t in evaluate(result)]
