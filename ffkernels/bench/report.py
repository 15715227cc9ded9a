"""The benchmark's outputs: tables for people (plain text, or Markdown), JSON for machines, a PNG plot
(throughput and memory vs depth)."""
from __future__ import annotations

import json

from .machine import describe
from .network import ALGOS

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


def layer_table(rows: list, markdown: bool = False) -> str:
    """One block per shape: every case's time and its ratios to the floor, the reference and BP."""
    header = ["case", "median ms", "min-max ms", "samples/s", "x floor", "speed-up vs ref", "FF/BP per sample",
              "FF/BP-dx per sample"]
    blocks = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        b = rs[0]["batch"]
        title = (f"layer {rs[0]['in_features']} -> {rs[0]['out_features']}, B = {b} real samples "
                 f"(FF: {2 * b} rows = {b} pos + {b} neg; BP: {b} rows)")
        body = [[r["case"], _fmt(r["time"]["median_ms"], ".3f"),
                 f"{r['time']['min_ms']:.3f}-{r['time']['max_ms']:.3f}", _fmt(r["samples_per_s"], ",.0f"),
                 _fmt(r["ratio_to_floor"], ".2f"), _fmt(r["speedup_over_reference"], ".2f"),
                 _fmt(r["ff_bp_ratio_per_sample"], ".2f"), _fmt(r["ff_bp_dx_ratio_per_sample"], ".2f")]
                for r in rs]
        blocks.append(_block(title, _table(header, body, markdown), markdown))
    return "\n\n".join(blocks)


def _mib(v):
    return None if v is None else v / MiB


def network_table(net: dict, markdown: bool = False) -> str:
    """FF vs BP per depth: time, samples/s, memory (persistent, allocator peak, RSS peak); growth per layer."""
    rows = net["rows"]
    ratio = {(p["algo"], p["depth"]): p["ff_bp_ratio_per_sample"] for p in net["summary"]["per_depth"]}
    has_rss = any(r["peak_rss_bytes"] is not None for r in rows)
    header = ["depth", "algo", "backend", "median ms", "min-max ms", "samples/s", "ms/sample", "FF/BP per sample",
              "persistent MiB", "peak alloc MiB"] + ["peak RSS MiB"] * has_rss
    body = [[r["depth"], r["algo"], r["backend"], f"{r['time']['median_ms']:.2f}",
             f"{r['time']['min_ms']:.2f}-{r['time']['max_ms']:.2f}", f"{r['samples_per_s']:,.0f}",
             f"{r['ms_per_sample']:.4f}", _fmt(ratio.get((r["algo"], r["depth"])), ".2f"),
             f"{_mib(r['persistent_bytes']):.1f}", _fmt(_mib(r["peak_alloc_bytes"]), ".1f")]
            + [_fmt(_mib(r["peak_rss_bytes"]), ".1f")] * has_rss
            for r in sorted(rows, key=lambda r: (r["depth"], ALGOS.index(r["algo"])))]
    r0 = rows[0]
    title = (f"whole network: {r0['in_features']} inputs, depth x {r0['width']}-wide layers, batch {r0['batch']} "
             "real samples\n(ff: supervised, label in the input; ff-labeled: the same, the first layer's GEMMs "
             "shared by pos and neg; bp: same MLP + linear head, cross-entropy)")
    if markdown:
        title = title.replace("\n", " ")
    lines = [_block(title, _table(header, body, markdown), markdown), "",
             "memory growth per added layer (least-squares slope over depth):"]
    for key, label in (("persistent_bytes", "persistent"), ("peak_alloc_bytes", "peak alloc"),
                       ("peak_rss_bytes", "peak RSS")):
        g = net["summary"]["bytes_per_added_layer"][key]
        if any(v is not None for v in g.values()):
            lines.append(("- " if markdown else "  ") + f"{label:>10}: "
                         + ", ".join(f"{a.upper()} {_fmt(_mib(v), '.1f')} MiB" for a, v in g.items()))
    notes = [f"peak alloc: {net['memory_method']['alloc']}"]
    if net["memory_method"]["rss"]:
        notes.append(f"peak RSS: {net['memory_method']['rss']}")
    notes.append("persistent: parameters + optimizer state (+ gradients for BP) kept between steps")
    lines += ([""] + [f"- {n}" for n in notes]) if markdown else notes
    return "\n".join(lines)


def text_report(result: dict, markdown: bool = False) -> str:
    """Every table of ``result``, as plain text (the terminal) or Markdown (docs)."""
    s = result["settings"]
    parts = [f"ffkernels bench on {s['device']} ({s['dtype']}): {describe(result['machine'])}",
             f"timing: median of {s['repeats']} repeats after {s['warmup']} warm-up calls"
             f"{', min ' + str(s['min_time']) + ' s per repeat' if s['min_time'] else ''}"]
    if markdown:
        parts.append(f"command: `{s['command']}`")
    if result["layer"] is not None:
        parts.append(layer_table(result["layer"]["rows"], markdown))
        parts += [("- " if markdown else "") + f"skipped fused backend {b!r}: {why}"
                  for b, why in result["layer"]["skipped"]]
    if result["network"] is not None:
        parts.append(network_table(result["network"], markdown))
    return "\n\n".join(parts)


def write_markdown(path: str, result: dict) -> None:
    with open(path, "w") as f:
        f.write(text_report(result, markdown=True) + "\n")


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def write_plot(path: str, result: dict) -> None:
    """Throughput (samples/s) and peak training memory vs depth, FF and BP, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    net = result["network"]
    if net is None:
        raise ValueError("ffkernels bench: --plot shows the network part (throughput and memory vs depth); "
                         "it cannot be drawn with --no-network")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"ff": ("FF (fused)", "tab:blue", "o"), "ff-labeled": ("FF, labeled first layer", "tab:green", "^"),
              "bp": ("BP (autograd)", "tab:orange", "s")}
    for algo, (label, color, marker) in styles.items():
        rs = sorted((r for r in net["rows"] if r["algo"] == algo), key=lambda r: r["depth"])
        if not rs:
            continue
        depths = [r["depth"] for r in rs]
        ax_t.plot(depths, [r["samples_per_s"] for r in rs], marker=marker, color=color, label=label)
        ax_m.plot(depths, [_mib(r["peak_alloc_bytes"]) for r in rs], marker=marker, color=color,
                  label=f"{label}: peak")
        if algo != "ff-labeled":  # same parameters and optimizer state as "ff"
            ax_m.plot(depths, [_mib(r["persistent_bytes"]) for r in rs], ls="--", color=color, alpha=0.6,
                      label=f"{label}: params + optimizer state" + (" + grads" if algo == "bp" else ""))
    r0 = net["rows"][0]
    for ax, ylabel in ((ax_t, "real samples / s"), (ax_m, "MiB above the process before the model")):
        ax.set_xlabel(f"depth (layers of width {r0['width']})")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({r["depth"] for r in net["rows"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylim(bottom=0)
    ax_m.set_ylim(bottom=0)
    ax_t.set_title(f"training throughput, batch {r0['batch']}")
    ax_m.set_title("peak training memory (allocator level)")
    s = result["settings"]
    fig.suptitle(f"ffkernels bench, {s['device']} {s['dtype']}: {describe(result['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
