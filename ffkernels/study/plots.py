"""PNG plots of a study folder, from results.json and the stored t-SNE maps (matplotlib, Agg canvas; pyplot
and the global backend are left alone):

- ``transfer_<dataset>.png``: linear-probe accuracy per layer (and all layers), one line per algorithm, one panel
  per pretext (the first probe of the config)
- ``curves_<dataset>.png``: pretext test accuracy and training loss per epoch, one column per pretext
- ``tsne_<dataset>_<pretext>.png``: t-SNE of the test features, one row per algorithm, one column per layer,
  points coloured by class
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.ticker import MaxNLocator

from .algos import ALGOS
from .tables import ALGO_NAMES, grouped, order
from .store import StudyStore

COLORS = {name: a.color for name, a in ALGOS.items()}
LOSS_NAMES = {"ff": "FF loss (mean over layers)", "bp": "BP cross-entropy",
              "bp-goodness-last": "BP-G last: goodness loss", "bp-goodness-all": "BP-G all: goodness loss (mean)"}


def _figure(nrows: int, ncols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_transfer(store: StudyStore, dataset: str) -> str:
    rows = [r for r in store.rows if r["dataset"] == dataset]
    g = grouped(rows)
    _, pretexts, algos = order(rows)
    fig, axes = _figure(1, len(pretexts), 3.6, 3.0)
    base = store.baseline(dataset)
    for ax, p in zip(axes[0], pretexts):
        for a in algos:
            runs = g.get((dataset, p, a))
            if not runs:
                continue
            acc = 100 * np.array([r["transfer"]["layers"] + [r["transfer"]["all"]] for r in runs])
            xs = np.arange(acc.shape[1])
            ax.errorbar(xs, acc.mean(0), yerr=acc.std(0, ddof=1) if len(acc) > 1 else None, marker="o", capsize=3,
                        color=COLORS[a], label=ALGO_NAMES[a])
            ax.set_xticks(xs, [str(i + 1) for i in range(acc.shape[1] - 1)] + ["all"])
        if base:
            ax.axhline(100 * base["pixels"]["best_transfer"], color="gray", ls=":", label="pixels")
            ax.axhline(100 * base["untrained"]["best_transfer"], color="gray", ls="-.", label="untrained")
        ax.set_title(p)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("linear-probe test accuracy (%)")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{dataset}: transfer of frozen features (mean ± std over seeds)")
    path = os.path.join(store.out, f"transfer_{dataset}.png")
    fig.savefig(path, dpi=110)
    return path


def plot_curves(store: StudyStore, dataset: str) -> str:
    rows = [r for r in store.rows if r["dataset"] == dataset]
    g = grouped(rows)
    _, pretexts, algos = order(rows)
    fig, axes = _figure(2, len(pretexts), 3.6, 2.8)
    for col, p in enumerate(pretexts):
        acc_ax, loss_ax = axes[0][col], axes[1][col]
        for a in algos:
            runs = g.get((dataset, p, a))
            if not runs:
                continue
            curves = runs[0]["curves"]
            acc = 100 * np.array([r["curves"]["pretext_accuracy"] for r in runs])
            loss = np.array([[np.mean(step) for step in r["curves"]["loss"]] for r in runs])
            acc_ax.plot(curves["eval_epoch"], acc.mean(0), marker=".", color=COLORS[a], label=ALGO_NAMES[a])
            loss_ax.plot(curves["epoch"], loss.mean(0), marker=".", color=COLORS[a],
                         label=LOSS_NAMES[a])
        acc_ax.set_title(p)
        loss_ax.set_yscale("log")
        loss_ax.set_xlabel("epoch")
        for ax in (acc_ax, loss_ax):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("pretext test accuracy (%)")
    axes[1][0].set_ylabel("training loss (log)")
    axes[0][0].legend(fontsize="small")
    axes[1][0].legend(fontsize="small")
    fig.suptitle(f"{dataset}: training curves (mean over seeds)")
    path = os.path.join(store.out, f"curves_{dataset}.png")
    fig.savefig(path, dpi=110)
    return path


def plot_tsne(store: StudyStore, dataset: str, pretext: str) -> "str | None":
    maps = {a: store.load_embedding(dataset, pretext, a) for a in ALGO_NAMES}
    maps = {a: m for a, m in maps.items() if m is not None}
    if not maps:
        return None
    n_layers = max(m[2].shape[0] for m in maps.values())
    fig, axes = _figure(len(maps), n_layers, 2.8, 2.8)
    cmap = "tab10"
    n_classes = max(10, max(int(m[1].max()) + 1 for m in maps.values()))
    for row, (a, (seed, labels, coords)) in enumerate(maps.items()):
        for layer in range(n_layers):
            ax = axes[row][layer]
            ax.set_xticks([])
            ax.set_yticks([])
            if layer >= coords.shape[0]:
                ax.set_visible(False)
                continue
            points = ax.scatter(coords[layer, :, 0], coords[layer, :, 1], c=labels, cmap=cmap, s=3, vmin=-0.5,
                                vmax=n_classes - 0.5)  # class k sits mid-way in its colour band
            ax.set_title(f"{ALGO_NAMES[a]} layer {layer + 1} (seed {seed})", fontsize="small")
    fig.colorbar(points, ax=[ax for row in axes for ax in row], ticks=range(n_classes), shrink=0.8, label="class")
    fig.suptitle(f"{dataset} / {pretext}: t-SNE of test features, coloured by class")
    path = os.path.join(store.out, f"tsne_{dataset}_{pretext}.png")
    fig.savefig(path, dpi=110)
    return path


def write_plots(store: StudyStore) -> list:
    """Every plot of the folder; returns the paths written."""
    rows = store.rows
    if not rows:
        return []
    datasets, pretexts, _ = order(rows)
    paths = []
    for d in datasets:
        paths += [plot_transfer(store, d), plot_curves(store, d)]
        paths += [p for p in (plot_tsne(store, d, t) for t in pretexts) if p]
    return paths
