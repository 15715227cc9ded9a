"""Run a study: for every dataset x seed x pretext x algorithm, train on the pretext task, then measure
transfer (the linear probes per layer and on all layers concatenated), cluster quality and t-SNE maps.

Every algorithm of the same seed starts from the same weights (FFLinear and nn.Linear share their
initialization and are built after the same ``torch.manual_seed``), sees the same transformed inputs in the
same batches every epoch (and FF and the BP-goodness ablations the same negative labels), and trains for the
same epochs with the same batch size.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from ..data import Dataset, load_dataset, subsample
from ..precision import precision_context
from ..training import progress_iter
from .algos import check_algo, make_trainer, runs_on
from .config import StudyConfig
from .embedding import tsne_2d, tsne_points
from .pretext import PretextTask, get_pretext, make_hybrid_data, make_pretext_data, make_scff_data
from .store import StudyStore, row_key
from .transfer import baseline, transfer

PRETEXT_TEST_SEED = 12345   # the pretext test set is the same for every seed and algorithm


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, independent of any global RNG."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


def pretext_data(task: PretextTask, x, y, image_shape, cfg: StudyConfig, generator: torch.Generator,
                 test: bool = False):
    """A label task's (inputs, labels), a contrast task's (real images, hybrid images), or the pairs task's
    (images,) to train on (the trainer pairs them per batch) and its fixed (positives, negatives) to test on."""
    if task.kind == "pairs":
        return make_scff_data(x, image_shape, cfg.batch_size, cfg.scff_shift, generator) if test else (x,)
    if task.kind == "contrast":
        return make_hybrid_data(x, image_shape, cfg.hybrid_blur_steps, generator)
    return make_pretext_data(task, x, y, image_shape, generator)


# ---- one run -------------------------------------------------------------------------------------------

def run_one(ds: Dataset, task: PretextTask, algo: str, seed: int, cfg: StudyConfig, device="cpu",
            backend: str = "auto", progress: bool = False, want_tsne: bool = False):
    """Train one network on the pretext task and measure it. Returns (row, tsne) where tsne is None or
    (labels (n,), [coords (n, 2) per layer])."""
    check_algo(algo)
    t_start = time.perf_counter()
    num_labels = task.classes(ds.num_classes)
    test_data = pretext_data(task, ds.x_test, ds.y_test, ds.image_shape, cfg, _generator(PRETEXT_TEST_SEED), test=True)
    torch.manual_seed(seed)
    trainer = make_trainer(algo, [ds.in_features, *cfg.hidden], task, num_labels, cfg, device, backend,
                           ds.image_shape)

    # loss: every epoch (FF: one value per layer; BP: the cross-entropy; BP-goodness: one per loss layer);
    # pretext accuracy: every eval_every epochs
    curves = {"epoch": [], "loss": [], "eval_epoch": [], "pretext_accuracy": []}
    train_seconds = 0.0
    epochs = progress_iter(range(1, cfg.epochs + 1), progress, desc=f"{ds.name}/{task.name}/{algo}/seed{seed}",
                           leave=False, unit="epoch")
    with precision_context(cfg.precision, device):  # bf16: training and its pretext accuracy under autocast
        for epoch in epochs:
            data = pretext_data(task, ds.x_train, ds.y_train, ds.image_shape, cfg, _generator(seed, epoch, 0))
            st = trainer.epoch(data, _generator(seed, epoch, 1), progress, f"epoch {epoch}")
            train_seconds += st.seconds
            curves["epoch"].append(epoch)
            curves["loss"].append(st.loss)
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                curves["eval_epoch"].append(epoch)
                curves["pretext_accuracy"].append(trainer.pretext_accuracy(test_data))
                if progress:
                    epochs.set_postfix(pretext_acc=f"{curves['pretext_accuracy'][-1]:.3f}")
    # the transfer probes read the features of the fp32 master weights, in fp32

    f_train, f_test = trainer.features(ds.x_train), trainer.features(ds.x_test)
    measured = transfer(f_train, ds.y_train, f_test, ds.y_test, ds.num_classes, cfg)
    tsne = None
    if want_tsne and cfg.tsne_points > 0:
        idx = tsne_points(len(ds.y_test), cfg.tsne_points)
        tsne = (ds.y_test[idx].numpy(), [tsne_2d(f[idx.to(f.device)], seed=0) for f in f_test])
    row = {"dataset": ds.name, "pretext": task.name, "algo": algo, "seed": int(seed),
           "pretext_classes": num_labels, "pretext_accuracy": curves["pretext_accuracy"][-1], **measured,
           "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t_start,
           "samples_per_s": len(ds.y_train) * cfg.epochs / train_seconds,
           "backend": trainer.backend, "device": str(device),
           "threads": torch.get_num_threads(), "n_train": len(ds.y_train), "n_test": len(ds.y_test),
           "features_input": trainer.features_input, "curves": curves, "config": cfg.to_dict()}
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
        check_algo(a)
    # every dataset is read before the folder is touched: a missing or corrupt one leaves nothing behind (the
    # first stays loaded for the runs; the others are read again when their turn comes)
    loaded = {}
    for name in dict.fromkeys(datasets):
        ds = subsample(load_dataset(name, data_root, download), cfg.max_train, cfg.max_test)
        loaded = loaded or {name: ds}
    store = StudyStore(out, cfg, overwrite)
    # seed-major: every task of the first seed finishes before the next seed starts (an interrupted long study
    # has whole seeds); algorithms without a counterpart on a task (BP on hybrid images) are not planned
    plan = [row_key(d, t.name, a, s) for d in datasets for s in seeds for t in tasks for a in algos if runs_on(a, t)]
    todo = [k for k in plan if not store.has(k)]
    done = len(plan) - len(todo)
    log(f"ffkernels study: {len(plan)} runs planned in {out!r}"
        + (f", {done} already finished there (skipped)" if done else "")
        + f"; config {cfg.fingerprint()}")
    bar = progress_iter(todo, progress and bool(todo), desc="study", unit="run")
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
