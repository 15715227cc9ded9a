"""The ``scff`` pretext's trainer: self-contrastive Forward-Forward (Chen, Liu, Laydevant, Grollier, arXiv 2409.11593;
official code neurophysics-cnrsthales/contrastive-forward-forward), on the study's network.

What it takes from SCFF: the pairs (``pretext.scff_pairs``: positive = the sum of two standardized shifted views of
one image, negative = of two images, one offset k per batch); the loss of every layer (``loss="scff"``:
softplus(theta+ - G+) + softplus(G- - theta-) + lambda * |G+|, G the mean of the squared ReLU outputs, thresholds per
layer from ``StudyConfig.scff_thresholds``); the first layer reading the sum as it is (SCFF's first layer applies
its weights to both standardized halves and adds them: no normalization of the sum, so a positive's larger norm is
part of what it sees); features for the probes from the pair (x, x), i.e. the layer input 2 * standardize(x).

What is the study's: the width and depth (``StudyConfig.hidden``), Adam with the study's lr and batch, the
normalization before the later layers (``StudyConfig.norm``), all layers trained at once (SCFF trains them one after
another with AdamW and a decaying lr), the probes.
"""
from __future__ import annotations

import torch

from ..linear import FFLinear
from ..net import FFNet
from ..training import EpochStats, run_batches
from .config import StudyConfig
from .features import ff_features, pair_wins
from .pretext import PretextTask, scff_pairs, standardize

def scff_thresholds(cfg: StudyConfig, layers: int) -> list:
    """(theta+, theta-) of each of ``layers`` layers: the configured pairs, the last one repeated."""
    pairs = list(cfg.scff_thresholds)
    return [pairs[min(i, len(pairs) - 1)] for i in range(layers)]


def scff_net(dims, cfg: StudyConfig, device, backend: str) -> FFNet:
    """The FF net of the scff pretext: mean goodness, the scff loss with each layer's thresholds, the first layer
    without normalization (its input is already a sum of standardized views)."""
    layers = [FFLinear(a, b, goodness="mean", loss="scff", threshold=tp, threshold_neg=tn, scff_lambda=cfg.scff_lambda,
                       norm="none" if i == 0 else cfg.norm, lr=cfg.ff_lr, backend=backend, device=device)
              for i, ((a, b), (tp, tn)) in enumerate(zip(zip(dims[:-1], dims[1:]), scff_thresholds(cfg, len(dims) - 1)))]
    return FFNet(modules=layers)


class SCFFTrainer:
    features_input = "2 * standardize(x): the pair (x, x)"

    def __init__(self, dims, task: PretextTask, image_shape, cfg: StudyConfig, device, backend: str):
        if task.kind != "pairs":
            raise ValueError(f"ffkernels: SCFFTrainer trains the scff pretext, not {task.name!r}")
        self.cfg, self.image_shape = cfg, tuple(image_shape)
        self.net = scff_net(dims, cfg, device, backend)
        self.backend = self.net.backend

    def _param(self):
        return self.net.layers[0].weight

    def epoch(self, data, generator, progress=False, desc="train") -> EpochStats:
        (x,) = data
        n, p = len(x), self._param()

        def step(idx):
            if len(idx) == 1:  # the pairs need two images: a last batch of one borrows a random other image
                idx = torch.cat([idx, (idx + torch.randint(1, n, (1,), generator=generator)) % n])
            pos, neg, _ = scff_pairs(x[idx], self.image_shape, self.cfg.scff_shift, generator)
            return self.net.ff_step(pos.to(p.device, p.dtype), neg.to(p.device, p.dtype)).losses

        return run_batches(n, self.cfg.batch_size, generator, step, p.device, progress, desc)

    @torch.no_grad()
    def pretext_accuracy(self, data) -> float:
        """The fraction of test pairs whose positive has more goodness (summed over the predict layers) than its
        negative."""
        return pair_wins(self.net, data[0], data[1])

    def features(self, x) -> list:
        return ff_features(self.net, 2 * standardize(x), None)
