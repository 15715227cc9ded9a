"""The FF-vs-BP self-supervised study (Brenig & Timofte 2023, arXiv 2309.11955) as a rerunnable tool.

    from ffkernels.study import StudyConfig, run_study
    store = run_study("runs/demo", ["mnist5k"], ["rotation"], ["ff", "bp"], [0], StudyConfig(hidden=(500, 500)))

Modules: pretext (tasks), algos (FF, BP, the BP-goodness ablation), probe and transfer (the linear probes),
metrics (k-NN, silhouette), embedding (t-SNE), features, runner (training and measuring), store (the output
folder), tables / report (report.md) / claims (the paper's claims as differences), paper (the preset and the
reported numbers), doc_blocks (docs/study.md's generated blocks), plots (PNGs), config, cli, demo.
"""
from .config import StudyConfig
from .pretext import PRETEXTS, get_pretext, make_pretext_data
from .probe import Standardizer, fit_linear_probe, probe_accuracy
from .runner import run_one, run_study
from .store import StudyFolderError, StudyStore

__all__ = ["StudyConfig", "PRETEXTS", "get_pretext", "make_pretext_data", "Standardizer", "fit_linear_probe",
           "probe_accuracy", "run_one", "run_study", "StudyFolderError", "StudyStore"]
