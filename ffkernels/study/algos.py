"""The algorithms a study compares, each as a trainer with one interface (train an epoch, score the pretext
task, give the frozen features):

| algo               | network and training                                                                   |
|--------------------|----------------------------------------------------------------------------------------|
| `ff`               | FFNet, each layer on its own FF loss (fused kernels)                                   |
| `bp`               | BPMLP: the same layers + a linear head, cross-entropy, end to end                      |
| `bp-goodness-last` | the same layers, no head, end to end on FF's goodness loss at the last layer only     |
| `bp-goodness-all`  | the same layers, no head, end to end on the sum of FF's goodness loss of every layer  |

The two ``bp-goodness`` algorithms are the paper's ablation: FF's input (the label written into the image,
negatives with a wrong label), FF's loss, but gradients through the whole network. They predict like FF, by
the goodness of each label: over the layers their loss reads (the last one; for ``-all`` the layers after the
first, as FF). Only ``ff`` trains on a "contrast" pretext (hybrid images): backprop has no counterpart there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import reference as ref
from ..bp import BPMLP, make_bp_optimizer
from ..config import FFConfig
from ..labels import embed_label, embed_neutral, wrong_labels
from ..net import FFNet
from ..training import EpochStats, accuracy, bp_accuracy, run_batches, train_bp_epoch, train_ff_epoch
from .config import StudyConfig
from .features import bp_features, ff_features, pair_wins
from .pretext import PretextTask
from .scff import SCFFTrainer

EVAL_BATCH = 1000


@dataclass(frozen=True)
class Algo:
    name: str
    label: str          # in tables and plots
    color: str          # in plots
    description: str


ALGOS = {a.name: a for a in (
    Algo("ff", "FF", "tab:red", "Forward-Forward: every layer on its own goodness loss"),
    Algo("bp", "BP", "tab:blue", "backprop: linear head, cross-entropy"),
    Algo("bp-goodness-last", "BP-G last", "tab:green", "backprop on FF's goodness loss at the last layer"),
    Algo("bp-goodness-all", "BP-G all", "tab:purple", "backprop on FF's goodness loss summed over every layer"),
)}
ALGO_GROUPS = {"both": ("ff", "bp"), "all": tuple(ALGOS)}


def check_algo(name: str) -> None:
    if name not in ALGOS:
        raise ValueError(f"ffkernels: unknown algorithm {name!r}; expected one of {', '.join(map(repr, ALGOS))}")


def runs_on(algo: str, task: PretextTask) -> bool:
    """Whether ``algo`` has a counterpart on ``task`` (only FF trains on a contrast or pairs task)."""
    return task.kind == "label" or algo == "ff"


class FFTrainer:
    def __init__(self, dims, task: PretextTask, num_labels: int, cfg: StudyConfig, device, backend: str):
        self.task, self.num_labels, self.cfg = task, num_labels, cfg
        self.net = FFNet(dims, goodness=cfg.goodness, threshold=cfg.threshold, loss=cfg.loss, norm=cfg.norm,
                         lr=cfg.ff_lr, backend=backend, device=device)
        self.backend = self.net.backend
        self.contrast = task.kind == "contrast"
        self.features_input = ("plain input (no label slots)" if self.contrast
                               else "neutral label (1/num_labels in each label slot)")

    def _param(self):
        return self.net.layers[0].weight

    def epoch(self, data, generator, progress=False, desc="train") -> EpochStats:
        if not self.contrast:
            x, y = data
            return train_ff_epoch(self.net, x, y, self.num_labels, self.cfg.batch_size, generator, progress, desc)
        x_pos, x_neg = data
        p = self._param()
        return run_batches(len(x_pos), self.cfg.batch_size, generator,
                           lambda idx: self.net.ff_step(x_pos[idx].to(p.device, p.dtype),
                                                        x_neg[idx].to(p.device, p.dtype)).losses,
                           p.device, progress, desc)

    @torch.no_grad()
    def pretext_accuracy(self, data) -> float:
        """Label tasks: FFNet.predict. Contrast: the fraction of test images whose goodness (summed over the
        predict layers) is above that of their hybrid."""
        if not self.contrast:
            return accuracy(self.net, data[0], data[1], self.num_labels)
        return pair_wins(self.net, data[0], data[1], EVAL_BATCH)

    def features(self, x) -> list:
        return ff_features(self.net, x, None if self.contrast else self.num_labels)


class BPTrainer:
    backend = "torch-autograd"
    features_input = "plain input"

    def __init__(self, dims, num_labels: int, cfg: StudyConfig, device):
        self.cfg = cfg
        self.net = BPMLP(dims, num_labels, norm=cfg.norm, device=device)
        self.opt = make_bp_optimizer(self.net, lr=cfg.bp_lr)

    def epoch(self, data, generator, progress=False, desc="train") -> EpochStats:
        return train_bp_epoch(self.net, self.opt, data[0], data[1], self.cfg.batch_size, generator, progress, desc)

    def pretext_accuracy(self, data) -> float:
        return bp_accuracy(self.net, data[0], data[1])

    def features(self, x) -> list:
        return bp_features(self.net, x)


class GoodnessBPTrainer:
    """End-to-end backprop of FF's loss (``reference.ff_loss`` with FFLinear's threshold rule) through BPMLP's
    layers without a head, on FF's labelled positives and negatives."""

    backend = "torch-autograd"
    features_input = "neutral label (1/num_labels in each label slot)"

    def __init__(self, dims, num_labels: int, cfg: StudyConfig, device, where: str):
        if where not in ("last", "all"):
            raise ValueError(f"ffkernels: the goodness loss goes on the 'last' layer or 'all', got {where!r}")
        self.cfg, self.num_labels = cfg, num_labels
        self.net = BPMLP(dims, None, norm=cfg.norm, device=device)
        self.opt = make_bp_optimizer(self.net, lr=cfg.bp_lr)
        n = len(dims) - 1
        self.layer_cfgs = [FFConfig(goodness=cfg.goodness, loss=cfg.loss,
                                    threshold=FFConfig.default_threshold(cfg.goodness, w) if cfg.threshold is None
                                    else cfg.threshold) for w in dims[1:]]
        self.loss_layers = [n - 1] if where == "last" else list(range(n))
        self.predict_layers = [n - 1] if where == "last" else (list(range(1, n)) if n > 1 else [0])

    def _param(self):
        return next(self.net.parameters())

    def losses(self, x_pos, x_neg) -> torch.Tensor:
        """FF's loss of every loss layer, (len(loss_layers),), differentiable end to end."""
        feats = self.net.features(torch.cat([x_pos, x_neg]))
        n = len(x_pos)
        return torch.stack([ref.ff_loss(ref.goodness(feats[i][:n], c.goodness), ref.goodness(feats[i][n:], c.goodness),
                                        c) for i, c in ((i, self.layer_cfgs[i]) for i in self.loss_layers)])

    def epoch(self, data, generator, progress=False, desc="train") -> EpochStats:
        x, y = data
        p = self._param()

        def step(idx):
            xb = x[idx].to(p.device, p.dtype)
            y_pos = y[idx]
            y_neg = wrong_labels(y_pos, self.num_labels, generator)  # the same draws as train_ff_epoch
            losses = self.losses(embed_label(xb, y_pos.to(p.device), self.num_labels),
                                 embed_label(xb, y_neg.to(p.device), self.num_labels))
            self.opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.opt.step()
            return losses

        return run_batches(len(y), self.cfg.batch_size, generator, step, p.device, progress, desc)

    @torch.no_grad()
    def scores(self, x) -> torch.Tensor:
        """(n, num_labels): goodness over the predict layers of x with each label written in."""
        cols = []
        for c in range(self.num_labels):
            feats = self.net.features(embed_label(x, torch.full((len(x),), c, device=x.device), self.num_labels))
            cols.append(sum(ref.goodness(feats[i], self.layer_cfgs[i].goodness) for i in self.predict_layers))
        return torch.stack(cols, 1)

    def pretext_accuracy(self, data) -> float:
        p = self._param()
        correct = 0
        for xb, yb in zip(data[0].split(EVAL_BATCH), data[1].split(EVAL_BATCH)):
            correct += int((self.scores(xb.to(p.device, p.dtype)).argmax(1).cpu() == yb).sum())
        return correct / max(1, len(data[1]))

    def features(self, x) -> list:
        return bp_features(self.net, embed_neutral(x, self.num_labels))


def make_trainer(algo: str, dims, task: PretextTask, num_labels: int, cfg: StudyConfig, device, backend: str,
                 image_shape=None):
    """The trainer of ``algo`` on ``task``. Call after ``torch.manual_seed(seed)``: every algorithm draws its
    layers' initial weights first, so all of them start from the same weights for one seed."""
    check_algo(algo)
    if not runs_on(algo, task):
        raise ValueError(f"ffkernels: {algo} has no counterpart on the {task.name} task (FF only)")
    if algo == "ff" and task.kind == "pairs":
        return SCFFTrainer(dims, task, image_shape, cfg, device, backend)
    if algo == "ff":
        return FFTrainer(dims, task, num_labels, cfg, device, backend)
    if algo == "bp":
        return BPTrainer(dims, num_labels, cfg, device)
    return GoodnessBPTrainer(dims, num_labels, cfg, device, algo.rsplit("-", 1)[1])
