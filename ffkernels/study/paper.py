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

def paper_settings() -> list:
    """(setting, value, where it comes from) for every setting of the preset: docs/study.md lists these. The
    values are read from PAPER_PRESET and StudyConfig's defaults, not written twice."""
    from .config import StudyConfig

    d, p = StudyConfig(), PAPER_PRESET
    hidden = f"{len(p['hidden'])} x {p['hidden'][0]}" if len(set(p["hidden"])) == 1 else "-".join(map(str, p["hidden"]))
    return [
        ("network", f"MLP {hidden} ReLU, normalization before each hidden layer", "paper (summary)"),
        ("BP head", "one extra linear layer to the pretext labels", "paper (summary)"),
        ("pretext training", f"{p['epochs']} epochs, Adam, fixed lr {p['lr']:g} (FF per layer; BP lr {p['bp_lr']:g}, "
                             "end to end)", "paper (summary)"),
        ("linear classifier (`--probe paper`)", f"{d.paper_probe_epochs} epochs of Adam on the raw frozen features, "
                                                f"lr {d.paper_probe_lr:g}, batch {d.paper_probe_batch_size}",
         "epochs: paper (summary); Adam: issue #9; lr, batch: ours"),
        ("second probe (`--probe lbfgs`)", f"standardized features, {d.probe_steps} L-BFGS steps, L2 "
                                           f"{d.probe_weight_decay:g}", "ours (this project's default probe)"),
        ("FF input", "label one-hot in the first pixels; negatives with a random wrong label", "paper (summary)"),
        ("FF prediction", "the label with the highest goodness summed over the last 3 layers", "paper (summary)"),
        ("pretext tasks", "supervised, rotation (4), flip (2), flip h+v (4), jigsaw 2x2 (24)", "paper (summary)"),
        ("tasks the preset runs", ", ".join(p["pretext"]) + f"; algorithms {p['algo']}; {p['seeds']} seeds",
         "issue #9 (flip-hv on request: --pretext)"),
        ("hybrid negatives", f"mask: random bits blurred {d.hybrid_blur_steps} times with [1/4, 1/2, 1/4], cut at 0.5",
         "Hinton 2022 (the blur count is ours)"),
        ("normalization", f"`{d.norm}` (Hinton's length normalization up to a constant)", "ours (the kind is not stated)"),
        ("batch size", str(d.batch_size), "ours (not stated)"),
        ("FF loss, threshold", f"`{d.loss}` loss, `{d.goodness}` goodness, threshold = width (FFLinear's rule)",
         "ours (FFLinear's defaults)"),
        ("data", "mnist5k: 4,000 train / 1,000 test real MNIST digits (the paper: full MNIST, 60,000 / 10,000)",
         "ours (offline machine)"),
        ("pretext test accuracy", f"every {p['eval_every']} epochs", "ours (cost)"),
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
