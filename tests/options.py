"""The option values the sweeps run: every norm, goodness, loss and optimizer path of the kernels."""
from __future__ import annotations

import itertools

NORMS = ("rms", "l2", "none")
GOODNESS = ("sum", "mean")
LOSSES = {  # each loss kind with its defaults, and with a non-default threshold / alpha and norm_eps (a misplaced
    # eps of 1e-8 would be invisible in float32; 0.1 is not)
    "hinton": {"hinton": dict(loss="hinton"),
               "hinton-t0.5-eps0.1": dict(loss="hinton", threshold=0.5, norm_eps=0.1)},
    "symba": {"symba": dict(loss="symba"),
              "symba-a1.5-eps0.1": dict(loss="symba", symba_alpha=1.5, norm_eps=0.1)},
    # two thresholds and the penalty; then the layer's default threshold for both sides, a larger penalty
    "scff": {"scff-t2-tn3-l0.05": dict(loss="scff", threshold=2.0, threshold_neg=3.0, scff_lambda=0.05),
             "scff-l0.5-eps0.1": dict(loss="scff", scff_lambda=0.5, norm_eps=0.1)},
}
LOSS_VARIANTS = {name: kw for variants in LOSSES.values() for name, kw in variants.items()}
OPTIMIZERS = {  # Adam with/without coupled weight decay, SGD plain / momentum / momentum + weight decay
    "adam": dict(optimizer="adam"),
    "adam-wd": dict(optimizer="adam", lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
    "sgd": dict(optimizer="sgd", lr=0.05),
    "sgd-momentum": dict(optimizer="sgd", lr=0.05, momentum=0.9),
    "sgd-momentum-wd": dict(optimizer="sgd", lr=0.02, momentum=0.5, weight_decay=0.1),
}


def option_cases(full: bool = True) -> list:
    """(id, FFLinear keyword options, bias) for every norm x goodness x loss kind x optimizer: with all four of its
    (loss variant, bias) pairings, or (``full=False``) with one, cycling through the four."""
    cases = []
    for j, (norm, good, kind, opt) in enumerate(itertools.product(NORMS, GOODNESS, LOSSES, OPTIMIZERS)):
        pairings = [(v, b) for v in LOSSES[kind] for b in (True, False)]
        for variant, bias in pairings if full else [pairings[j % 4]]:
            cases.append((f"{norm}-{good}-{variant}-{opt}-{'bias' if bias else 'nobias'}",
                          dict(norm=norm, goodness=good, **LOSS_VARIANTS[variant], **OPTIMIZERS[opt]), bias))
    return cases


def rotating_options(i: int) -> tuple:
    """(options, bias) for the i-th case of a shape sweep: the options rotate so every shape meets several."""
    variant = list(LOSS_VARIANTS)[i % len(LOSS_VARIANTS)]
    opt = list(OPTIMIZERS)[(i // len(LOSS_VARIANTS)) % len(OPTIMIZERS)]
    cfg = dict(norm=NORMS[i % 3], goodness=GOODNESS[(i // 3) % 2], **LOSS_VARIANTS[variant], **OPTIMIZERS[opt])
    return cfg, bool(i % 5)


PEERS = {  # peer normalization (lambda, mu); mu = 0: r' is the batch mean itself, r only read
    "peer0.5-m0.9": dict(peer_norm=0.5, peer_momentum=0.9),
    "peer2-m0.5": dict(peer_norm=2.0, peer_momentum=0.5),
    "peer0.3-m0": dict(peer_norm=0.3, peer_momentum=0.0),
}
ADAM_KINDS, SGD_KINDS = ("adam", "adam-wd"), ("sgd-momentum", "sgd-momentum-wd", "sgd")


def peer_options(i: int) -> tuple:
    """(id, options, bias) for the i-th case of a peer-normalization sweep: every 8 consecutive cases meet each loss
    kind x goodness x optimizer kind (Adam, SGD) once; the norm, the loss and optimizer variants, (lambda, mu) from
    PEERS and the bias rotate."""
    kind, good = ("hinton", "symba")[i % 2], GOODNESS[(i // 2) % 2]
    opts = ADAM_KINDS if (i // 4) % 2 == 0 else SGD_KINDS
    variant, opt = list(LOSSES[kind])[(i // 8) % 2], opts[(i // 8) % len(opts)]
    norm, peer, bias = NORMS[i % 3], list(PEERS)[(i // 3) % 3], i % 5 != 4
    cfg = dict(norm=norm, goodness=good, **LOSS_VARIANTS[variant], **OPTIMIZERS[opt], **PEERS[peer])
    return f"{norm}-{good}-{variant}-{opt}-{peer}-{'bias' if bias else 'nobias'}", cfg, bias
