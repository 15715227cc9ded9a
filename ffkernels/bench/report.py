"""The benchmark's outputs: tables for people (plain text, or Markdown), JSON for machines, a PNG plot
(throughput and memory vs depth), and the issue-12 targets (targets.py) as met / not met / not measured.

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so a run killed
while saving leaves the previous complete file, never half of one."""
from __future__ import annotations

import json
import os
import tempfile

from ..cnn import describe_layers
from . import targets
from .conv_cases import ConvShape, conv_flops
from .machine import describe
from .network import ALGOS, row_dtype

MiB = 2 ** 20


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _table(header: list, rows: list, markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(map(str, r)) + " |" for r in [header, *rows]]
        lines.insert(1, "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _block(title: str, table: str, markdown: bool) -> str:
    return f"**{title}**\n\n{table}" if markdown else f"{title}\n{table}"


def _layer_cells(r: dict) -> list:
    if r.get("time") is None:
        return [r["case"], "error", "-", "-", "-", "-", "-", "-"]
    return [r["case"], _fmt(r["time"]["median_ms"], ".3f"),
            f"{r['time']['min_ms']:.3f}-{r['time']['max_ms']:.3f}", _fmt(r["samples_per_s"], ",.0f"),
            _fmt(r["ratio_to_floor"], ".2f"), _fmt(r["speedup_over_reference"], ".2f"),
            _fmt(r["ff_bp_ratio_per_sample"], ".2f"), _fmt(r["ff_bp_dx_ratio_per_sample"], ".2f")]


def floor_flops(batch: int, in_features: int, out_features: int) -> int:
    """FLOPs of the floor: z = x̂Wᵀ and dW = Gᵀx̂ over the 2B rows, 2·(2B)·K·N each."""
    return 2 * 2 * (2 * batch) * in_features * out_features


def layer_table(rows: list, markdown: bool = False) -> str:
    """One block per shape (and dtype, when the rows have several): every case's time and its ratios to the
    floor, the reference and BP; then the cases that failed, with their errors."""
    header = ["case", "median ms", "min-max ms", "samples/s", "x floor", "speed-up vs ref", "FF/BP per sample",
              "FF/BP-dx per sample"]
    several = len({r.get("dtype") for r in rows}) > 1
    blocks = []
    for shape, dtype in dict.fromkeys((r["shape"], r.get("dtype")) for r in rows):
        rs = [r for r in rows if r["shape"] == shape and r.get("dtype") == dtype]
        b = rs[0]["batch"]
        title = (f"layer {rs[0]['in_features']} -> {rs[0]['out_features']}, B = {b} real samples "
                 f"(FF: {2 * b} rows = {b} pos + {b} neg; BP: {b} rows)" + (f", {dtype}" if several else ""))
        block = _block(title, _table(header, [_layer_cells(r) for r in rs], markdown), markdown)
        notes = _case_notes(rs, markdown)
        floor = next((r for r in rs if r["case"] == "floor" and r.get("time")), None)
        if floor is not None:  # what the GEMMs achieved: compare with the GEMM rate docs/gpu-sizing.md assumes
            flops = floor_flops(floor["batch"], floor["in_features"], floor["out_features"])
            notes.append(f"{'- ' if markdown else '  '}floor: {flops / 1e9:.2f} GFLOP (two GEMMs over {2 * b} rows) "
                         f"in {floor['time']['median_ms']:.3f} ms = {flops / floor['time']['median_s'] / 1e12:.3g} "
                         "TFLOP/s")
        blocks.append("\n".join([block, *([""] * markdown), *notes]) if notes else block)
    return "\n\n".join(blocks)


def _case_notes(rs: list, markdown: bool) -> list:
    """The lines under a layer table (linear or conv): the failed cases, and each autocast case's speed-up."""
    bullet = "- " if markdown else "  "
    return ([f"{bullet}{r['case']} failed: {r['error']}" for r in rs if r.get("error")]
            + [f"{bullet}{r['case']}: {r['speedup_over_fp32']:.2f}x the speed of its fp32 case "
               f"(torch.autocast bf16; x floor is to floor-bf16)" for r in rs if r.get("speedup_over_fp32")])


def _conv_layer_cells(r: dict) -> list:
    if r.get("time") is None:
        return [r["case"], "error", "-", "-", "-", "-", "-"]
    return [r["case"], _fmt(r["time"]["median_ms"], ".3f"),
            f"{r['time']['min_ms']:.3f}-{r['time']['max_ms']:.3f}", _fmt(r["samples_per_s"], ",.0f"),
            _fmt(r["ratio_to_floor"], ".2f"), _fmt(r["speedup_over_reference"], ".2f"),
            _fmt(r["ff_bp_dx_ratio_per_sample"], ".2f")]


def conv_layer_table(rows: list, markdown: bool = False) -> str:
    """One block per conv shape (and dtype, when the rows have several): every case's time and its ratios to the
    floor, the reference and BP-dx; the bf16 speed-ups, what the floor's convolutions achieved, the failed cases."""
    header = ["case", "median ms", "min-max ms", "images/s", "x floor", "speed-up vs ref", "FF/BP-dx per image"]
    several = len({r.get("dtype") for r in rows}) > 1
    bullet = "- " if markdown else "  "
    blocks = []
    for shape_text, dtype in dict.fromkeys((r["shape"], r.get("dtype")) for r in rows):
        rs = [r for r in rows if r["shape"] == shape_text and r.get("dtype") == dtype]
        r0, b = rs[0], rs[0]["batch"]
        ff = (f"FF: {b} images, competitive over class groups" if r0["loss"] == "competitive"
              else f"FF: {2 * b} images = {b} pos + {b} neg, hinton")
        title = (f"conv {r0['in_channels']} -> {r0['out_channels']}, {r0['height']}x{r0['width']}, k{r0['kernel']} "
                 f"p{r0['padding']}, B = {b} real images ({ff}; BP: {b} images)" + (f", {dtype}" if several else ""))
        block = _block(title, _table(header, [_conv_layer_cells(r) for r in rs], markdown), markdown)
        notes = _case_notes(rs, markdown)
        shape = ConvShape.parse(shape_text)
        for floor in (r for r in rs if r["kind"] == "floor" and r.get("time")):
            flops = 2 * conv_flops(shape, floor["images"])  # the forward and the weight-gradient convolutions
            notes.append(f"{bullet}{floor['case']}: {flops / 1e9:.3g} GFLOP (conv + weight-gradient conv over "
                         f"{floor['images']} images) in {floor['time']['median_ms']:.3f} ms = "
                         f"{flops / floor['time']['median_s'] / 1e9:.3g} GFLOP/s, plus the optimizer's pass")
        blocks.append("\n".join([block, *([""] * markdown), *notes]) if notes else block)
    return "\n\n".join(blocks)


def _mib(v):
    return None if v is None else v / MiB


def _network_rows_table(rows: list, summary: dict, markdown: bool) -> str:
    ratio = {(p["algo"], p["depth"]): p["ff_bp_ratio_per_sample"] for p in summary["per_depth"]}
    has_rss = any(r.get("peak_rss_bytes") is not None for r in rows)
    header = ["depth", "algo", "backend", "median ms", "min-max ms", "samples/s", "ms/sample", "FF/BP per sample",
              "persistent MiB", "peak alloc MiB"] + ["peak RSS MiB"] * has_rss
    body = []
    for r in sorted(rows, key=lambda r: (r["depth"], ALGOS.index(r["algo"]))):
        t = r.get("time")
        timing = ([f"{t['median_ms']:.2f}", f"{t['min_ms']:.2f}-{t['max_ms']:.2f}", f"{r['samples_per_s']:,.0f}",
                   f"{r['ms_per_sample']:.4f}"] if t is not None else ["error", "-", "-", "-"])
        body.append([r["depth"], r["algo"], r["backend"] or "-", *timing,
                     _fmt(ratio.get((r["algo"], r["depth"])), ".2f"), _fmt(_mib(r.get("persistent_bytes")), ".1f"),
                     _fmt(_mib(r.get("peak_alloc_bytes")), ".1f")]
                    + [_fmt(_mib(r.get("peak_rss_bytes")), ".1f")] * has_rss)
    return _table(header, body, markdown)


def network_table(net: dict, markdown: bool = False, default_dtype: str = "float32") -> str:
    """FF vs BP per depth (one table per dtype): time, samples/s, memory (persistent, allocator peak, RSS peak);
    growth per added layer; the configurations that failed, with their errors."""
    rows = net["rows"]
    dtypes = list(dict.fromkeys(row_dtype(r, default_dtype) for r in rows))
    summary = net["summary"]
    by_dtype = summary.get("by_dtype") or {dtypes[0]: summary["bytes_per_added_layer"]}
    parts = []
    for dt in dtypes:
        rs = [r for r in rows if row_dtype(r, default_dtype) == dt]
        sub = {"per_depth": [p for p in summary["per_depth"] if p.get("dtype", dt) == dt]}
        r0 = rs[0]
        if r0.get("model") == "cnn":
            bn = r0.get("conv_block") == "bn"  # rows from before the BatchNorm block have no conv_block: plain
            title = (f"conv network: {'x'.join(map(str, r0['image']))} images, depth d = the first d layers of "
                     f"{conv_net_layers(r0)} (k{r0['kernel_size']} p{r0['kernel_size'] // 2}), batch {r0['batch']} "
                     "images" + (f", {dt}" if len(dtypes) > 1 else "")
                     + f"\n(ff: FFNet of {'FFConvBlock2d (conv, ReLU, pool, BatchNorm)' if bn else 'FFConv2d'}, "
                     f"competitive loss over {r0['num_classes']} channel groups, ff_step_competitive; bp: BPCNN, the "
                     f"same convs{', pooling and BatchNorms' if bn else ' and pooling'} + linear head, cross-entropy)")
        else:
            title = (f"whole network: {r0['in_features']} inputs, depth x {r0['width']}-wide layers, batch "
                     f"{r0['batch']} real samples" + (f", {dt}" if len(dtypes) > 1 else "")
                     + "\n(ff: supervised, label in the input; ff-labeled: the same, the first layer's GEMMs "
                     "shared by pos and neg; bp: same MLP + linear head, cross-entropy)")
        if markdown:
            title = title.replace("\n", " ")
        lines = [_block(title, _network_rows_table(rs, sub, markdown), markdown), "",
                 "memory growth per added layer (least-squares slope over depth):"]
        growth = by_dtype.get(dt) or {}
        for key, label in (("persistent_bytes", "persistent"), ("peak_alloc_bytes", "peak alloc"),
                           ("transient_alloc_bytes", "transient"), ("peak_rss_bytes", "peak RSS")):
            g = growth.get(key) or {}
            if any(v is not None for v in g.values()):
                lines.append(("- " if markdown else "  ") + f"{label:>10}: "
                             + ", ".join(f"{a.upper()} {_fmt(_mib(v), '.1f')} MiB" for a, v in g.items()))
        failed = [f"{'- ' if markdown else '  '}depth {r['depth']} {r['algo']} failed: {r['error']}"
                  for r in rs if r.get("error")]
        if failed:
            lines += [""] * markdown + failed
        parts.append("\n".join(lines))
    notes = [f"peak alloc: {net['memory_method']['alloc']}"]
    if net["memory_method"]["rss"]:
        notes.append(f"peak RSS: {net['memory_method']['rss']}")
    notes.append("persistent: parameters + optimizer state (+ gradients for BP) kept between steps")
    if any("transient_alloc_bytes" in r for r in rows):
        notes.append("transient: peak alloc - persistent, what training needs beyond what the model keeps")
    return "\n\n".join(parts) + "\n" + "\n".join(([""] + [f"- {n}" for n in notes]) if markdown else notes)


def conv_net_layers(row: dict) -> str:
    """A conv net row's layers, e.g. ``c40-c80-pool-c160-c320-pool`` (all of them, not only this depth's; rows from
    before the BatchNorm block have no conv_block: plain)."""
    return describe_layers(row["channels"], set(row.get("pool_after") or ()), row.get("conv_block", "plain"))


def targets_block(result: dict, markdown: bool = False) -> str:
    """The issue-12 targets: met, not met or not measured (never asserted)."""
    title = "targets (issue 12; reported, not asserted)"
    entries = targets.evaluate(result)
    if markdown:
        return f"**{title}**\n\n" + "\n".join(f"- **{t['status']}**: {t['name']}: {t['detail']}" for t in entries)
    return title + "\n" + "\n".join(targets.lines(result))


def text_report(result: dict, markdown: bool = False) -> str:
    """Every table of ``result``, as plain text (the terminal) or Markdown (docs)."""
    s = result["settings"]
    parts = [f"ffkernels bench on {s['device']} ({s['dtype']}): {describe(result['machine'])}",
             f"timing: median of {s['repeats']} repeats after {s['warmup']} warm-up calls"
             f"{', min ' + str(s['min_time']) + ' s per repeat' if s['min_time'] else ''}"]
    if markdown:
        parts.append(f"command: `{s['command']}`")
    if result.get("complete") is False:
        why = result.get("interrupted") or "the run stopped before the end (killed, or still running)"
        parts.append(f"INCOMPLETE: {why}; the tables hold what was measured until then")
    if result["layer"] is not None and result["layer"]["rows"]:
        parts.append(layer_table(result["layer"]["rows"], markdown))
        by_dtype = result["layer"].get("by_dtype")
        skipped = ([(b, why, dt) for dt, v in by_dtype.items() for b, why in v["skipped"]] if by_dtype and
                   len(by_dtype) > 1 else [(b, why, None) for b, why in result["layer"]["skipped"]])
        parts += [("- " if markdown else "") + f"skipped fused backend {b!r}{f' in {dt}' if dt else ''}: {why}"
                  for b, why, dt in skipped]
    if result["network"] is not None and result["network"]["rows"]:
        parts.append(network_table(result["network"], markdown, s["dtype"].split(",")[0]))
    conv_layer = result.get("conv_layer")  # --conv (absent from results saved before it)
    if conv_layer is not None and conv_layer["rows"]:
        parts.append(conv_layer_table(conv_layer["rows"], markdown))
        by_dtype = conv_layer.get("by_dtype")
        skipped = ([(b, why, dt) for dt, v in by_dtype.items() for b, why in v["skipped"]] if by_dtype and
                   len(by_dtype) > 1 else [(b, why, None) for b, why in conv_layer["skipped"]])
        parts += [("- " if markdown else "") + f"skipped fused conv backend {b!r}{f' in {dt}' if dt else ''}: {why}"
                  for b, why, dt in skipped]
    conv_net = result.get("conv_network")
    if conv_net is not None and conv_net["rows"]:
        parts.append(network_table(conv_net, markdown, s["dtype"].split(",")[0]))
    if not s.get("conv"):  # the issue-12 targets are the linear cases'
        parts.append(targets_block(result, markdown))
    return "\n\n".join(parts)


def _atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_markdown(path: str, result: dict) -> None:
    _atomic_write(path, text_report(result, markdown=True) + "\n")


def write_json(path: str, result: dict) -> None:
    """``result`` as JSON, with the targets evaluated on it (``targets``), written atomically."""
    _atomic_write(path, json.dumps({**result, "targets": targets.evaluate(result)}, indent=2) + "\n")


def write_plot(path: str, result: dict) -> None:
    """Throughput (samples/s) and peak training memory vs depth, FF and BP, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    net = result["network"] or result.get("conv_network")  # --conv: the conv net
    if not net or not net["rows"]:
        raise ValueError("ffkernels bench: --plot shows the network part (throughput and memory vs depth); "
                         "it cannot be drawn with --no-network")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"ff": ("FF (fused)", "tab:blue", "o"), "ff-labeled": ("FF, labeled first layer", "tab:green", "^"),
              "bp": ("BP (autograd)", "tab:orange", "s")}
    default = result["settings"]["dtype"].split(",")[0]
    dtypes = list(dict.fromkeys(row_dtype(r, default) for r in net["rows"]))
    for k, dt in enumerate(dtypes):
        suffix, alpha = (f" {dt}" if len(dtypes) > 1 else ""), (1.0 if k == 0 else 0.55)
        for algo, (label, color, marker) in styles.items():
            rs = sorted((r for r in net["rows"] if r["algo"] == algo and row_dtype(r, default) == dt),
                        key=lambda r: r["depth"])
            timed = [r for r in rs if r.get("samples_per_s") is not None]
            if timed:
                ax_t.plot([r["depth"] for r in timed], [r["samples_per_s"] for r in timed], marker=marker,
                          color=color, alpha=alpha, label=label + suffix)
            mem = [r for r in rs if r.get("peak_alloc_bytes") is not None]
            if not mem:
                continue
            depths = [r["depth"] for r in mem]
            ax_m.plot(depths, [_mib(r["peak_alloc_bytes"]) for r in mem], marker=marker, color=color, alpha=alpha,
                      label=f"{label}{suffix}: peak")
            if algo != "ff-labeled":  # same parameters and optimizer state as "ff"
                ax_m.plot(depths, [_mib(r["persistent_bytes"]) for r in mem], ls="--", color=color, alpha=0.6 * alpha,
                          label=f"{label}{suffix}: params + optimizer state" + (" + grads" if algo == "bp" else ""))
    r0 = net["rows"][0]
    conv = r0.get("model") == "cnn"
    for ax, ylabel in ((ax_t, "real samples / s"), (ax_m, "MiB above the process before the model")):
        ax.set_xlabel(f"depth (the first d conv layers of {conv_net_layers(r0)})" if conv
                      else f"depth (layers of width {r0['width']})")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({r["depth"] for r in net["rows"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylim(bottom=0)
    ax_m.set_ylim(bottom=0)
    ax_t.set_title(f"{'conv net ' if conv else ''}training throughput, batch {r0['batch']}")
    ax_m.set_title("peak training memory (allocator level)")
    s = result["settings"]
    fig.suptitle(f"ffkernels bench, {s['device']} {s['dtype']}: {describe(result['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
