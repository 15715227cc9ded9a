"""Run a study: for every dataset x pretext x algorithm x seed, train on the pretext task, then measure
transfer (linear probe per layer and on all layers concatenated), cluster quality and t-SNE maps.

FF and BP of the same seed start from the same weights (FFLinear and nn.Linear share their initialization
and are built after the same ``torch.manual_seed``), see the same transformed inputs in the same batches
every epoch, and train for the same epochs with the same batch size.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from ..data import Dataset, load_dataset, subsample
from ..layers import FFNet
from ..bp import BPMLP, make_bp_optimizer
from ..training import accuracy, bp_accuracy, progress_iter, train_bp_epoch, train_ff_epoch
from .config import StudyConfig
from .embedding import tsne_2d, tsne_points
from .features import bp_features, ff_features
from .metrics import cluster_metrics
from .pretext import PretextTask, get_pretext, make_pretext_data
from .probe import Standardizer, fit_linear_probe
from .store import StudyStore, row_key

ALGOS = ("ff", "bp")
PRETEXT_TEST_SEED = 12345   # the pretext test set is the same for every seed and algorithm
UNTRAINED_SEED = 0


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, independent of any global RNG."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


# ---- transfer ------------------------------------------------------------------------------------------

def transfer(f_train: list, y_train, f_test: list, y_test, num_classes: int, cfg: StudyConfig) -> dict:
    """Linear-probe test accuracy on each layer's features and on all layers concatenated, plus the
    cluster metrics of each layer. ``f_train``/``f_test``: one (n, width) tensor per layer."""
    y_train_d = y_train.to(f_train[0].device)

    def probe(a, b):
        std = Standardizer.fit(a)
        return fit_linear_probe(std(a), y_train_d, num_classes, cfg.probe_steps, cfg.probe_weight_decay) \
            .accuracy(std(b), y_test)

    layers = [probe(a, b) for a, b in zip(f_train, f_test)]
    everything = probe(torch.cat(f_train, 1), torch.cat(f_test, 1)) if len(f_train) > 1 else layers[0]
    cluster = [cluster_metrics(a, y_train_d, b, y_test, num_classes, cfg.knn_k) for a, b in zip(f_train, f_test)]
    best = max(range(len(layers)), key=lambda i: layers[i])
    best_acc, best_where = (everything, "all") if everything > layers[best] else (layers[best], best + 1)
    return {"transfer": {"layers": layers, "all": everything}, "best_transfer": best_acc,
            "best_transfer_layer": best_where,
            "cluster": {k: [c[k] for c in cluster] for k in ("knn_accuracy", "silhouette")}}


def baseline(ds: Dataset, cfg: StudyConfig, device) -> dict:
    """What transfer must beat: the probe on the raw pixels, and on an untrained network of the same shape."""
    x_tr, x_te = ds.x_train.to(device), ds.x_test.to(device)
    pixels = transfer([x_tr], ds.y_train, [x_te], ds.y_test, ds.num_classes, cfg)
    torch.manual_seed(UNTRAINED_SEED)
    net = BPMLP([ds.in_features, *cfg.hidden], ds.num_classes, norm=cfg.norm, device=device)
    untrained = transfer(bp_features(net, ds.x_train), ds.y_train, bp_features(net, ds.x_test), ds.y_test,
                         ds.num_classes, cfg)
    return {"pixels": pixels, "untrained": untrained}


# ---- one run -------------------------------------------------------------------------------------------

def _build(algo: str, ds: Dataset, num_labels: int, cfg: StudyConfig, seed: int, device, backend: str):
    torch.manual_seed(seed)
    dims = [ds.in_features, *cfg.hidden]
    if algo == "ff":
        net = FFNet(dims, goodness=cfg.goodness, threshold=cfg.threshold, loss=cfg.loss, norm=cfg.norm,
                    lr=cfg.ff_lr, backend=backend, device=device)
        return net, None
    net = BPMLP(dims, num_labels, norm=cfg.norm, device=device)
    return net, make_bp_optimizer(net, lr=cfg.bp_lr)


def run_one(ds: Dataset, task: PretextTask, algo: str, seed: int, cfg: StudyConfig, device="cpu",
            backend: str = "auto", progress: bool = False, want_tsne: bool = False):
    """Train one network on the pretext task and measure it. Returns (row, tsne) where tsne is None or
    (labels (n,), [coords (n, 2) per layer])."""
    if algo not in ALGOS:
        raise ValueError(f"ffkernels: unknown algorithm {algo!r}; expected one of {', '.join(map(repr, ALGOS))}")
    t_start = time.perf_counter()
    num_labels = task.classes(ds.num_classes)
    x_test_p, y_test_p = make_pretext_data(task, ds.x_test, ds.y_test, ds.image_shape, _generator(PRETEXT_TEST_SEED))
    net, opt = _build(algo, ds, num_labels, cfg, seed, device, backend)

    def evaluate():
        return (accuracy(net, x_test_p, y_test_p, num_labels) if algo == "ff"
                else bp_accuracy(net, x_test_p, y_test_p))

    # loss: every epoch (FF: one value per layer; BP: the cross-entropy); pretext accuracy: every eval_every epochs
    curves = {"epoch": [], "loss": [], "eval_epoch": [], "pretext_accuracy": []}
    train_seconds = 0.0
    epochs = progress_iter(range(1, cfg.epochs + 1), progress, desc=f"{ds.name}/{task.name}/{algo}/seed{seed}",
                       leave=False, unit="epoch")
    for epoch in epochs:
        x_ep, y_ep = make_pretext_data(task, ds.x_train, ds.y_train, ds.image_shape, _generator(seed, epoch, 0))
        batches = _generator(seed, epoch, 1)
        if algo == "ff":
            st = train_ff_epoch(net, x_ep, y_ep, num_labels, cfg.batch_size, batches, progress, f"epoch {epoch}")
        else:
            st = train_bp_epoch(net, opt, x_ep, y_ep, cfg.batch_size, batches, progress, f"epoch {epoch}")
        train_seconds += st.seconds
        curves["epoch"].append(epoch)
        curves["loss"].append(st.loss)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            curves["eval_epoch"].append(epoch)
            curves["pretext_accuracy"].append(evaluate())
            if progress:
                epochs.set_postfix(pretext_acc=f"{curves['pretext_accuracy'][-1]:.3f}")

    features = (lambda x: ff_features(net, x, num_labels)) if algo == "ff" else (lambda x: bp_features(net, x))
    f_train, f_test = features(ds.x_train), features(ds.x_test)
    measured = transfer(f_train, ds.y_train, f_test, ds.y_test, ds.num_classes, cfg)
    tsne = None
    if want_tsne and cfg.tsne_points > 0:
        idx = tsne_points(len(ds.y_test), cfg.tsne_points)
        tsne = (ds.y_test[idx].numpy(), [tsne_2d(f[idx.to(f.device)], seed=0) for f in f_test])
    row = {"dataset": ds.name, "pretext": task.name, "algo": algo, "seed": int(seed),
           "pretext_classes": num_labels, "pretext_accuracy": curves["pretext_accuracy"][-1], **measured,
           "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t_start,
           "samples_per_s": len(ds.y_train) * cfg.epochs / train_seconds,
           "backend": net.backend if algo == "ff" else "torch-autograd", "device": str(device),
           "threads": torch.get_num_threads(), "n_train": len(ds.y_train), "n_test": len(ds.y_test),
           "features_input": "neutral label (1/num_labels in each label slot)" if algo == "ff" else "plain input",
           "curves": curves, "config": cfg.to_dict()}
    return row, tsne


# ---- the whole study -----------------------------------------------------------------------------------

def run_study(out: str, datasets, pretexts, algos, seeds, cfg: StudyConfig, *, device="cpu", backend="auto",
              data_root=None, download: bool = False, overwrite: bool = False, progress: bool = True,
              log: Optional[Callable] = print) -> StudyStore:
    """Run every missing row of datasets x pretexts x algos x seeds into ``out`` (see store.StudyStore for the
    resume/refuse rules), then write report.md and the plots. Returns the store."""
    from .plots import write_plots
    from .report import write_report

    if log is print and progress:  # keep the progress bars intact
        from tqdm.auto import tqdm

        log = tqdm.write
    log = log or (lambda *a, **k: None)
    tasks = [get_pretext(p) for p in pretexts]
    for a in algos:
        if a not in ALGOS:
            raise ValueError(f"ffkernels: unknown algorithm {a!r}; expected one of {', '.join(map(repr, ALGOS))}")
    store = StudyStore(out, cfg, overwrite)
    plan = [row_key(d, t.name, a, s) for d in datasets for t in tasks for s in seeds for a in algos]
    todo = [k for k in plan if not store.has(k)]
    done = len(plan) - len(todo)
    log(f"ffkernels study: {len(plan)} runs planned in {out!r}"
        + (f", {done} already finished there (skipped)" if done else "")
        + f"; config {cfg.fingerprint()}")
    bar = progress_iter(todo, progress and bool(todo), desc="study", unit="run")
    loaded = {}
    for key in bar:
        name, pretext, algo, seed = key
        if name not in loaded:
            loaded = {name: subsample(load_dataset(name, data_root, download), cfg.max_train, cfg.max_test)}
        ds = loaded[name]
        if store.baseline(name) is None:
            store.set_baseline(name, baseline(ds, cfg, device))
        want_tsne = not store.has_embedding(name, pretext, algo)
        row, tsne = run_one(ds, get_pretext(pretext), algo, seed, cfg, device, backend, progress, want_tsne)
        if tsne is not None:
            store.save_embedding(name, pretext, algo, seed, tsne[1], tsne[0])
        store.add_row(row)
        log(f"  {name}/{pretext}/{algo}/seed{seed}: pretext acc {row['pretext_accuracy']:.2%}, best transfer "
            f"{row['best_transfer']:.2%} (layer {row['best_transfer_layer']}), {row['samples_per_s']:.0f} samples/s, "
            f"{row['wall_seconds']:.1f} s")
    write_report(store)
    write_plots(store)
    return store
