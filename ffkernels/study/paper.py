"""The paper's setting (``ffkernels study --preset paper``) and the numbers it reports, in one place.

Brenig & Timofte, *A Study of Forward-Forward Algorithm for Self-Supervised Learning*, arXiv 2309.11955 (2023).
The paper's PDF is not available where this was written: what is known of its setting and numbers comes from
a secondary summary (the project's issue #9). Settings the summary does not state are ours, and marked so.
"""
from __future__ import annotations

from .config import PAPER_HIDDEN

# argparse destinations of ``ffkernels study`` -> value; explicit flags still override (cli.py)
PAPER_PRESET = {
    "hidden": list(PAPER_HIDDEN),
    "epochs": 60,
    "lr": 1e-4,
    "bp_lr": 1e-4,
    "probe": "both",
    "pretext": ["supervised", "rotation", "flip", "jigsaw", "hybrid"],
    "algo": "all",
    "seeds": 2,
    "eval_every": 10,
}

# (setting, value, where it comes from): docs/study.md lists these
PAPER_SETTINGS = [
    ("network", "MLP 4 x 2000 ReLU, normalization before each hidden layer", "paper (summary)"),
    ("BP head", "one extra linear layer to the pretext labels", "paper (summary)"),
    ("pretext training", "60 epochs, Adam, fixed lr 1e-4 (FF per layer, BP end to end)", "paper (summary)"),
    ("linear classifier", "100 epochs on the frozen network (`--probe paper`: Adam lr 1e-3, batch 100, raw features)",
     "epochs: paper (summary); optimizer lr, batch: ours"),
    ("FF input", "label one-hot in the first pixels; negatives with a random wrong label", "paper (summary)"),
    ("FF prediction", "the label with the highest goodness summed over the last 3 layers", "paper (summary)"),
    ("pretext tasks", "supervised, rotation (4), flip (2), flip h+v (4), jigsaw 2x2 (24)", "paper (summary)"),
    ("hybrid negatives", "mask: random bits blurred 6 times with [1/4, 1/2, 1/4], cut at 0.5",
     "Hinton 2022 (the blur count is ours)"),
    ("normalization", "RMS (Hinton's length normalization up to a constant)", "ours (the kind is not stated)"),
    ("batch size", "100", "ours (not stated)"),
    ("FF loss, threshold", "softplus loss, sum-of-squares goodness, threshold = width", "ours (FFLinear's defaults)"),
    ("data", "mnist5k: 4,000 train / 1,000 test real MNIST digits (the paper: full MNIST, 60,000 / 10,000)",
     "ours (offline machine)"),
    ("pretext eval", "every 10 epochs", "ours (cost)"),
]

# Reported transfer accuracy (%) on MNIST: (pretext, algo) -> value. "bp-goodness-*" are the ablation
# (classification = supervised transfer, rotation transfer); "hybrid" is unsupervised FF with hybrid negatives.
PAPER_REPORTED_MNIST = {
    ("supervised", "ff"): 98.0, ("supervised", "bp"): 98.8,
    ("rotation", "ff"): 76.3, ("rotation", "bp"): 97.5,
    ("flip", "ff"): 83.9, ("flip", "bp"): 97.7,
    ("flip-hv", "ff"): 79.0, ("flip-hv", "bp"): 97.9,
    ("jigsaw", "ff"): 53.7, ("jigsaw", "bp"): 92.6,
    ("supervised", "bp-goodness-last"): 98.7, ("rotation", "bp-goodness-last"): 97.7,
    ("supervised", "bp-goodness-all"): 98.7, ("rotation", "bp-goodness-all"): 85.7,
    ("hybrid", "ff"): 97.9,
}
