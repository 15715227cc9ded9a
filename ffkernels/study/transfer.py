"""Transfer of frozen features to the dataset's real classes: the linear probes of ``StudyConfig.probes`` on
every layer and on all layers concatenated, plus the cluster metrics per layer; and the reference points
(raw pixels, an untrained network of the same shape) measured the same way."""
from __future__ import annotations

import torch

from ..bp import BPMLP
from .config import StudyConfig
from .features import bp_features
from .metrics import cluster_metrics
from .pretext import standardize
from .probe import SCFF_PROBE, fit_adam_probes, probe_accuracy

PROBE_SEED = 0       # the Adam probes' initialization (and PROBE_SEED + 1: batch order), the same for every run
UNTRAINED_SEED = 0


def _probe(name: str, f_train: list, y_train, f_test: list, y_test, num_classes: int, cfg: StudyConfig) -> dict:
    """Probe ``name``'s accuracy on every layer and on all layers concatenated (one layer: "all" is it)."""
    many = len(f_train) > 1
    trains = f_train + ([torch.cat(f_train, 1)] if many else [])
    tests = f_test + ([torch.cat(f_test, 1)] if many else [])
    if name == "lbfgs":
        acc = [probe_accuracy(a, y_train, b, y_test, num_classes, cfg.probe_steps, cfg.probe_weight_decay)
               for a, b in zip(trains, tests)]
    elif name == "paper":  # the per-layer and all-layer classifiers side by side (same result as one by one)
        probes = fit_adam_probes(trains, y_train, num_classes, cfg.paper_probe_epochs, cfg.paper_probe_lr,
                                 cfg.paper_probe_batch_size, PROBE_SEED)
        acc = [p.accuracy(b.float(), y_test) for p, b in zip(probes, tests)]
    elif name == "scff":  # per sample standardized per layer, then concatenated (SCFF's read-out)
        trains = [standardize(a.float()) for a in f_train]
        tests = [standardize(b.float()) for b in f_test]
        if many:
            trains, tests = trains + [torch.cat(trains, 1)], tests + [torch.cat(tests, 1)]
        probes = fit_adam_probes(trains, y_train, num_classes, seed=PROBE_SEED, **SCFF_PROBE)
        acc = [p.accuracy(b, y_test) for p, b in zip(probes, tests)]
    else:
        raise ValueError(f"ffkernels: unknown probe {name!r}")
    layers, everything = acc[:len(f_train)], acc[-1]
    best = max(range(len(layers)), key=lambda i: layers[i])
    best, where = (everything, "all") if everything > layers[best] else (layers[best], best + 1)
    return {"layers": layers, "all": everything, "best": best, "best_layer": where}


def transfer(f_train: list, y_train, f_test: list, y_test, num_classes: int, cfg: StudyConfig) -> dict:
    """Every probe's test accuracy on each layer's features and on all layers concatenated, plus the cluster
    metrics of each layer. ``f_train``/``f_test``: one (n, width) tensor per layer. The first probe of
    ``cfg.probes`` also fills "transfer", "best_transfer" and "best_transfer_layer"."""
    y_train_d = y_train.to(f_train[0].device)
    probes = {name: _probe(name, f_train, y_train_d, f_test, y_test, num_classes, cfg) for name in cfg.probes}
    first = probes[cfg.probes[0]]
    cluster = [cluster_metrics(a, y_train_d, b, y_test, num_classes, cfg.knn_k) for a, b in zip(f_train, f_test)]
    return {"transfer": {"layers": first["layers"], "all": first["all"]}, "best_transfer": first["best"],
            "best_transfer_layer": first["best_layer"], "probes": probes,
            "cluster": {k: [c[k] for c in cluster] for k in ("knn_accuracy", "silhouette")}}


def baseline(ds, cfg: StudyConfig, device) -> dict:
    """What transfer must beat: the probes on the raw pixels, and on an untrained network of the same shape."""
    x_tr, x_te = ds.x_train.to(device), ds.x_test.to(device)
    pixels = transfer([x_tr], ds.y_train, [x_te], ds.y_test, ds.num_classes, cfg)
    torch.manual_seed(UNTRAINED_SEED)
    net = BPMLP([ds.in_features, *cfg.hidden], ds.num_classes, norm=cfg.norm, device=device)
    untrained = transfer(bp_features(net, ds.x_train), ds.y_train, bp_features(net, ds.x_test), ds.y_test,
                         ds.num_classes, cfg)
    return {"pixels": pixels, "untrained": untrained}
