"""report.md: the FF-vs-BP tables of a study folder (mean ± std over seeds), built from results.json alone."""
from __future__ import annotations

import os

from .claims import claims_table
from .paper import PAPER_REPORTED_MNIST, paper_settings
from .pretext import PRETEXTS
from .store import REPORT, StudyStore
from .tables import ALGO_NAMES, grouped, md, mean_std, order, reported_header

PAPER_DATASETS = ("mnist", "mnist5k")   # the reported numbers are MNIST's


def summary_table(rows, dataset: str) -> str:
    """Per pretext task: pretext accuracy, best transfer accuracy and training samples/s, FF next to BP."""
    g = grouped(rows)
    _, pretexts, algos = order(rows)
    header = ["pretext"]
    for what in ("pretext acc %", "best transfer %", "samples/s"):
        header += [f"{ALGO_NAMES[a]} {what}" for a in algos]
    header.append("seeds")
    body = []
    for p in pretexts:
        runs = {a: g.get((dataset, p, a), []) for a in algos}
        if not any(runs.values()):
            continue
        line = [p]
        line += [mean_std([r["pretext_accuracy"] for r in runs[a]]) for a in algos]
        line += [mean_std([r["best_transfer"] for r in runs[a]]) for a in algos]
        line += [mean_std([r["samples_per_s"] for r in runs[a]], percent=False, digits=0) for a in algos]
        line.append("/".join(str(len(runs[a])) for a in algos))
        body.append(line)
    return md(header, body)


def probe_table(rows, dataset: str) -> str:
    """Per pretext and algorithm, each probe's transfer: best (single layer or all) and the last layer alone."""
    g = grouped(rows)
    _, pretexts, algos = order(rows)
    probes = list(dict.fromkeys(p for r in rows if r["dataset"] == dataset for p in r.get("probes", {})))
    header = ["pretext", "algo"] + [f"{p} {what}" for p in probes for what in ("best %", "last layer %", "all %")]
    body = []
    for p in pretexts:
        for a in algos:
            runs = g.get((dataset, p, a))
            if runs:
                body.append([p, ALGO_NAMES[a]] + [mean_std(v) for pr in probes for v in (
                    [r["probes"][pr]["best"] for r in runs], [r["probes"][pr]["layers"][-1] for r in runs],
                    [r["probes"][pr]["all"] for r in runs])])
    return md(header, body)


def paper_settings_table() -> str:
    """The paper preset's settings and where each comes from (docs/study.md shows this table)."""
    return md(["setting", "value", "source"], paper_settings())


def paper_table(rows, dataset: str) -> str:
    """Our transfer next to the paper's reported MNIST numbers, for every (pretext, algo) either has."""
    g = grouped(rows)
    _, pretexts, algos = order(rows)
    probes = [p for p in ("paper", "lbfgs", "scff") if any(p in r.get("probes", {}) for r in rows if r["dataset"] == dataset)]
    header = ["pretext", "algo", reported_header(dataset, "%")]
    for p in probes:
        header += [f"ours, {p} probe, last layer %", f"ours, {p} probe, best %"]
    header.append("seeds")
    body = []
    for p in [t for t in PRETEXTS if t in pretexts or any(k[0] == t for k in PAPER_REPORTED_MNIST)]:
        for a in ALGO_NAMES:
            runs = g.get((dataset, p, a), [])
            reported = PAPER_REPORTED_MNIST.get((p, a))
            if not runs and reported is None:
                continue
            line = [p, ALGO_NAMES[a], "–" if reported is None else f"{reported:.1f}"]
            for pr in probes:
                line += [mean_std([r["probes"][pr]["layers"][-1] for r in runs if pr in r.get("probes", {})]),
                         mean_std([r["probes"][pr]["best"] for r in runs if pr in r.get("probes", {})])]
            line.append(str(len(runs)))
            body.append(line)
    return md(header, body)


def layer_table(rows, dataset: str) -> str:
    """Linear-probe test accuracy on every layer and on all layers concatenated."""
    g = grouped(rows)
    _, pretexts, algos = order(rows)
    n_layers = max(len(r["transfer"]["layers"]) for r in rows if r["dataset"] == dataset)
    header = ["pretext", "algo"] + [f"layer {i + 1}" for i in range(n_layers)] + ["all layers"]
    body = []
    for p in pretexts:
        for a in algos:
            runs = g.get((dataset, p, a))
            if runs:
                body.append([p, ALGO_NAMES[a]] + [mean_std([r["transfer"]["layers"][i] for r in runs])
                                                  for i in range(n_layers)]
                            + [mean_std([r["transfer"]["all"] for r in runs])])
    return md(header, body)


def cluster_table(rows, dataset: str, metric: str, percent: bool) -> str:
    g = grouped(rows)
    _, pretexts, algos = order(rows)
    n_layers = max(len(r["cluster"][metric]) for r in rows if r["dataset"] == dataset)
    header = ["pretext", "algo"] + [f"layer {i + 1}" for i in range(n_layers)]
    body = []
    for p in pretexts:
        for a in algos:
            runs = g.get((dataset, p, a))
            if runs:
                body.append([p, ALGO_NAMES[a]] + [mean_std([r["cluster"][metric][i] for r in runs], percent,
                                                            digits=1 if percent else 3) for i in range(n_layers)])
    return md(header, body)


def baseline_lines(baselines: dict) -> str:
    if not baselines:
        return ""
    px, un = baselines["pixels"], baselines["untrained"]
    return (f"Reference points (same probe): raw pixels {100 * px['best_transfer']:.1f}% "
            f"(k-NN {100 * px['cluster']['knn_accuracy'][0]:.1f}%, silhouette {px['cluster']['silhouette'][0]:.3f}); "
            f"untrained network of the same shape: best {100 * un['best_transfer']:.1f}% "
            f"(layer {un['best_transfer_layer']}; per layer "
            f"{', '.join(f'{100 * a:.1f}' for a in un['transfer']['layers'])}; all layers "
            f"{100 * un['transfer']['all']:.1f}%)." + _other_probes(px, un))


def _other_probes(px: dict, un: dict) -> str:
    """The reference points by the config's other probes (none with a single probe)."""
    names = list(px.get("probes", {}))[1:]
    return "".join(f" By the `{p}` probe: raw pixels {100 * px['probes'][p]['best']:.1f}%, untrained network best "
                   f"{100 * un['probes'][p]['best']:.1f}% (per layer "
                   f"{', '.join(f'{100 * a:.1f}' for a in un['probes'][p]['layers'])}; all layers "
                   f"{100 * un['probes'][p]['all']:.1f}%)." for p in names)


def timing_line(rows, dataset: str) -> str:
    rs = [r for r in rows if r["dataset"] == dataset]
    per = {a: sum(r["wall_seconds"] for r in rs if r["algo"] == a) for a in ALGO_NAMES}
    backends = {a: sorted({f"`{r['backend']}` on {r['device']}" for r in rs if r["algo"] == a}) for a in ALGO_NAMES}
    threads = sorted({r["threads"] for r in rs})
    return (f"Wall time of the runs (training, evaluation, probes, metrics, t-SNE): {sum(per.values()):.0f} s ("
            + ", ".join(f"{ALGO_NAMES[a]} {s:.0f} s" for a, s in per.items() if s) + "); backends: "
            + ", ".join(f"{ALGO_NAMES[a]} {' / '.join(b)}" for a, b in backends.items() if b) + "; threads: "
            + ", ".join(f"{t} ({sum(r['threads'] == t for r in rs)} runs)" for t in threads) + ".")


def wall_table(rows, dataset: str) -> str:
    """Every run's wall time (training, evaluation, probes, metrics, t-SNE), its training time and thread count,
    one column per seed: what results.json recorded for each run."""
    g = grouped(rows)
    _, pretexts, algos = order(rows)
    seeds = sorted({r["seed"] for r in rows if r["dataset"] == dataset})
    body = []
    for p in pretexts:
        for a in algos:
            runs = {r["seed"]: r for r in g.get((dataset, p, a), [])}
            if runs:
                body.append([p, ALGO_NAMES[a]] + [_wall_cell(runs[s]) if s in runs else "–" for s in seeds])
    return md(["pretext", "algo"] + [f"seed {s}: wall s" for s in seeds], body)


def _wall_cell(r) -> str:
    t = r["threads"]
    return f"{r['wall_seconds']:.0f} ({r['train_seconds']:.0f} training, {t} thread{'s' if t != 1 else ''})"


def console_summary(store: StudyStore) -> str:
    """The FF-vs-BP summary table of every dataset, for printing."""
    rows = store.rows
    datasets, _, _ = order(rows)
    return "\n\n".join(f"{d}\n{summary_table(rows, d)}\n{baseline_lines(store.baseline(d))}" for d in datasets)


def probe_description(cfg: dict) -> str:
    """One sentence per probe of the config, as report.md states them."""
    text = {"lbfgs": f"`lbfgs`: a linear probe (multinomial logistic regression, {cfg['probe_steps']} L-BFGS "
                     f"iterations, L2 {cfg['probe_weight_decay']:g}) trained on the frozen features of the training "
                     "split, each dimension standardized with the training split's mean and std, scored on the test "
                     "split's classes.",
            "paper": f"`paper`: a linear classifier on the raw frozen features, {cfg.get('paper_probe_epochs')} "
                     f"epochs of Adam (lr {cfg.get('paper_probe_lr', 0):g}, batch "
                     f"{cfg.get('paper_probe_batch_size')}), scored on the test split's classes.",
            "scff": "`scff`: SCFF's read-out: each layer's features standardized per sample, the layers concatenated, "
                    "dropout 0.2, one linear layer, 50 epochs of Adam 1e-3 (batch 64, the lr halved at 20-90% of the "
                    "epochs), scored on the test split's classes."}
    return " ".join(text[p] for p in cfg.get("probes", ["lbfgs"]))


def write_report(store: StudyStore) -> str:
    """Write ``report.md`` into the study folder and return its path."""
    rows, cfg = store.rows, store.results["config"]
    datasets, pretexts, _ = order(rows)
    hidden = "-".join(str(h) for h in cfg["hidden"])
    out = [
        "# Forward-Forward vs backprop: self-supervised pretext training and linear-probe transfer", "",
        f"Network: input-{hidden} (ReLU, `{cfg['norm']}` normalization before each layer), trained {cfg['epochs']} "
        f"epochs, batch {cfg['batch_size']}, Adam (FF lr {cfg['ff_lr']:g} per layer, goodness `{cfg['goodness']}`, "
        f"loss `{cfg['loss']}`; BP lr {cfg['bp_lr']:g}, linear head + cross-entropy, or no head and FF's goodness loss "
        f"for the ablation). Config fingerprint "
        f"`{store.results['fingerprint']}`.", "",
        "- **pretext acc**: accuracy on the pretext task over the test split (FF: the label with the highest "
        "goodness summed over the layers after the first; BP: arg-max of the head; BP-G last / BP-G all, the "
        "ablation trained end to end on FF's goodness loss: the label with the highest goodness at the last layer / "
        "summed over the layers after the first; `hybrid`: the fraction of test images whose goodness beats that "
        "of their hybrid image).",
        "- **transfer**: " + probe_description(cfg) + " Features of the networks that saw labels in their input "
        "are computed with the neutral label (1/num_labels in each label slot). **best transfer** is the best of "
        "the single layers and all layers concatenated" + (f", by the `{cfg['probes'][0]}` probe" if
                                                           len(cfg.get("probes", [])) > 1 else "") + ".",
        f"- **k-NN** ({cfg['knn_k']} neighbours, train split -> test split) and **silhouette** (test split, classes as "
        "clusters) use cosine geometry (each feature vector scaled to unit length): how much class information the "
        "neighbourhoods keep, and how separated the class clusters are. The t-SNE maps use the same geometry.",
        "- mean ± sample std over seeds; samples/s counts training inputs per second (FF: one positive and one "
        "negative pass per input).", ""]
    for d in datasets:
        out += [f"## {d}", "", summary_table(rows, d), "", baseline_lines(store.baseline(d)), "",
                timing_line(rows, d), "", "### Wall time per run", "", wall_table(rows, d), ""]
        if len(cfg.get("probes", ["lbfgs"])) > 1:
            out += ["### Transfer by probe (%)", "", probe_table(rows, d), ""]
        if d in PAPER_DATASETS:
            out += ["### Next to the paper's reported MNIST numbers", "",
                    "The paper's numbers are as reported (full MNIST; quoted from a secondary summary, see "
                    "`ffkernels/study/paper.py`); ours come from this folder's results.json. – : not reported / not "
                    "run (backprop has no counterpart on `hybrid`).", "", paper_table(rows, d), "",
                    "### The paper's claims as differences (points)", "",
                    "A − B per claim, paired by seed (mean ± std over the seeds both have); the untrained network "
                    "of the same shape is the dataset's reference point.", "",
                    claims_table(rows, store.baseline(d), d), ""]
        out += ["### Transfer accuracy per layer (%)", "", layer_table(rows, d), "",
                "### k-NN accuracy per layer (%)", "", cluster_table(rows, d, "knn_accuracy", True), "",
                "### Silhouette per layer", "", cluster_table(rows, d, "silhouette", False), "",
                "### Plots", "", f"![transfer per layer](transfer_{d}.png)", "", f"![training curves](curves_{d}.png)",
                ""]
        out += [f"![t-SNE {p}](tsne_{d}_{p}.png)" for p in pretexts
                if any(store.has_embedding(d, p, a) for a in ALGO_NAMES)]
        out.append("")
    path = os.path.join(store.out, REPORT)
    with open(path, "w") as f:
        f.write("\n".join(out))
    return path
