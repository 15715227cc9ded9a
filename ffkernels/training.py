"""Training loops shared by the CLI, the study and the benchmarks: supervised FF, and BP for comparison."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .augment import check_image_shape
from .augment import jitter as augment_jitter
from .labels import ff_pair, wrong_labels
from .net import FFNet
from .bp import BPMLP, bp_step


@dataclass
class EpochStats:
    epoch: int
    loss: list            # mean loss per layer over the epoch
    seconds: float        # training time of the epoch (no evaluation)
    samples_per_s: float  # real samples (one pos + one neg row each) per second
    test_accuracy: "float | None" = None
    head_loss: "float | None" = None  # mean cross-entropy of the net's head over the epoch (None without one)


@dataclass
class History:
    epochs: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"epochs": [e.__dict__ for e in self.epochs]}


def progress_iter(iterable, enabled: bool, **kw):
    """``iterable`` wrapped in a tqdm progress bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


@torch.no_grad()
def accuracy(net: FFNet, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int = 1000,
             method: "str | None" = None, shape=None) -> float:
    """Fraction of ``x`` whose predicted label (FFNet.predict: by ``method``, default the head when the net has
    one, else goodness) equals ``y``. ``shape``: what one row is viewed as for the net (e.g. (C, H, W) for a CNN)."""
    device = net.layers[0].weight.device
    dtype = net.layers[0].weight.dtype
    correct = torch.zeros((), dtype=torch.long, device=device)
    was_training = getattr(net, "training", None)  # None: a wrapper that is no nn.Module
    if was_training is not None:
        net.eval()  # modules between the layers that train differently (dropout) predict in eval mode
    try:
        for xb, yb in zip(x.split(batch_size), y.to(device).split(batch_size)):
            xb = xb if shape is None else xb.reshape(-1, *shape)
            pred = net.predict(xb.to(device, dtype), num_classes, method=method)
            correct += (pred == yb).sum()
    finally:
        if was_training is not None:
            net.train(was_training)
    return int(correct) / max(1, len(y))  # one host read


def train_ff_epoch(net: FFNet, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int,
                   generator: torch.Generator, progress: bool = False, desc: str = "train",
                   shared_first_layer: bool = True, *, negatives: str = "random", jitter: int = 0,
                   image_shape=None, scheduler=None) -> EpochStats:
    """One epoch of supervised FF: positives carry the true label, negatives a wrong one.

    ``shared_first_layer``: the first layer computes what positive and negative share once
    (``FFLinear.ff_step_labeled``); with False it steps on the explicit pair. Both draw the same random numbers,
    so they train on the same data stream. A net with a head (FFNet(head=True)) trains it in the same step.
    ``negatives``: "random" (uniform over the wrong labels) or "hard" (drawn from the model's own scores, see
    FFNet.ff_step_labeled). ``jitter=K``: each image shifted by up to ±K pixels (``augment.jitter``; needs
    ``image_shape``). ``scheduler``: an LRScheduler stepped after every training step.
    A net without ``ff_step_labeled`` (e.g. the data-parallel wrapper) gets explicit pairs via ``ff_step`` and
    supports only the plain recipe (random negatives, no jitter).
    """
    device = net.layers[0].weight.device
    dtype = net.layers[0].weight.dtype
    labeled = getattr(net, "ff_step_labeled", None)
    if labeled is None and (negatives != "random" or jitter):
        raise ValueError("ffkernels: hard negatives and jitter need a net with ff_step_labeled (an FFNet)")
    if jitter:
        check_image_shape(image_shape, x.shape[-1])
    first_layer = "shared" if shared_first_layer else "pair"
    perm = torch.randperm(len(y), generator=generator)
    batches = perm.split(batch_size)
    has_head = getattr(net, "head", None) is not None
    # running sums on the device, read once at the end of the epoch: no host sync per step (docs/design.md)
    sums = torch.zeros(len(net.layers) + 1, dtype=torch.float64, device=device)  # per-layer losses, then the head's
    shown = _LossDisplay(device) if progress else None
    t0 = time.perf_counter()
    bar = progress_iter(batches, progress, desc=desc, leave=False, unit="batch")
    for i, idx in enumerate(bar):
        if labeled is not None:
            xb = x[idx].to(device, dtype, non_blocking=True)
            if jitter:
                xb = augment_jitter(xb, image_shape, jitter, generator)
            y_pos = y[idx]
            y_neg = wrong_labels(y_pos, num_classes, generator) if negatives == "random" else None
            out = labeled(xb, y_pos.to(device), None if y_neg is None else y_neg.to(device), num_classes,
                          negatives=negatives, generator=generator, first_layer=first_layer)
        else:
            xp, xn = ff_pair(x[idx], y[idx], num_classes, generator)
            out = net.ff_step(xp.to(device, dtype, non_blocking=True), xn.to(device, dtype, non_blocking=True))
        if scheduler is not None:
            scheduler.step()
        sums[:-1] += out.losses.detach().to(device, torch.float64)
        head_loss = getattr(out, "head_loss", None)
        if head_loss is not None:
            sums[-1] += head_loss.detach().to(device, torch.float64)
        if shown is not None and i % 10 == 0:
            shown.update(bar, out.losses)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t0
    n = max(1, len(batches))
    means = (sums / n).tolist()  # the epoch's one host read of the losses
    return EpochStats(0, means[:-1], secs, len(y) / secs, head_loss=means[-1] if has_head else None)


class _LossDisplay:
    """The progress bar's loss postfix without a host sync: on a GPU each shown step's losses are copied to pinned
    host memory asynchronously and displayed at a later update once that copy has finished (an event query, which
    never waits); on the CPU they are shown at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending = None  # (host copy, event) of a GPU copy in flight

    def update(self, bar, losses: torch.Tensor) -> None:
        if not self.cuda:
            self._show(bar, losses.detach().double())
            return
        if self.pending is not None and self.pending[1].query():
            self._show(bar, self.pending[0])
            self.pending = None
        if self.pending is None:
            host = torch.empty(losses.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(losses.detach().double(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(losses.device))
            self.pending = (host, event)

    @staticmethod
    def _show(bar, losses: torch.Tensor) -> None:
        bar.set_postfix(loss=" ".join(f"{v:.3f}" for v in losses.tolist()))


@torch.no_grad()
def bp_accuracy(model: BPMLP, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, shape=None) -> float:
    """Fraction of ``x`` whose arg-max logit of the BP model equals ``y`` (each row viewed as ``shape`` if given), in
    eval mode (BatchNorm's running statistics)."""
    p = next(model.parameters())
    correct = torch.zeros((), dtype=torch.long, device=p.device)
    was_training = model.training
    model.eval()
    try:
        for xb, yb in zip(x.split(batch_size), y.to(p.device).split(batch_size)):
            xb = xb if shape is None else xb.reshape(-1, *shape)
            correct += (model(xb.to(p.device, p.dtype)).argmax(-1) == yb).sum()
    finally:
        model.train(was_training)
    return int(correct) / max(1, len(y))  # one host read


def run_batches(n: int, batch_size: int, generator: torch.Generator, step, device: torch.device,
                progress: bool = False, desc: str = "train") -> EpochStats:
    """One epoch over a fresh permutation of range(n) drawn from ``generator`` (the order ``train_ff_epoch`` draws),
    split into batches of ``batch_size``; ``step(idx)`` trains on one batch and returns its loss vector. The sums
    stay on ``device`` and are read once at the end (as train_ff_epoch); ``loss`` is their mean per batch."""
    batches = torch.randperm(n, generator=generator).split(batch_size)
    total = None
    shown = _LossDisplay(device) if progress else None
    t0 = time.perf_counter()
    bar = progress_iter(batches, progress, desc=desc, leave=False, unit="batch")
    for i, idx in enumerate(bar):
        loss = step(idx).detach().reshape(-1).to(device, torch.float64)
        total = loss if total is None else total + loss
        if shown is not None and i % 10 == 0:
            shown.update(bar, loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t0
    return EpochStats(0, (total / max(1, len(batches))).tolist() if total is not None else [], secs, n / secs)


def train_competitive_epoch(net: FFNet, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                            generator: torch.Generator, progress: bool = False, desc: str = "train", *,
                            shape=None, jitter: int = 0, image_shape=None, scheduler=None) -> EpochStats:
    """One epoch of ``FFNet.ff_step_competitive`` (every layer with loss="competitive": the class groups'
    cross-entropy, no negatives), batches in the order ``train_ff_epoch`` draws; ``jitter`` as there, then each row
    viewed as ``shape`` (e.g. (C, H, W) for a CNN)."""
    device, dtype = net.layers[0].weight.device, net.layers[0].weight.dtype

    def step(idx):
        xb = x[idx].to(device, dtype, non_blocking=True)
        if jitter:
            xb = augment_jitter(xb, image_shape, jitter, generator)
        out = net.ff_step_competitive(xb if shape is None else xb.reshape(-1, *shape), y[idx].to(device))
        if scheduler is not None:
            scheduler.step()
        return out.losses

    return run_batches(len(y), batch_size, generator, step, device, progress, desc)


def train_bp_epoch(model: BPMLP, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int, generator: torch.Generator, progress: bool = False,
                   desc: str = "train") -> EpochStats:
    """One epoch of backprop with cross-entropy (``reference.bp_step``), batches in the order
    ``train_ff_epoch`` would draw from the same generator state. ``loss`` is a one-element list."""
    p = next(model.parameters())
    return run_batches(len(y), batch_size, generator,
                       lambda idx: bp_step(model, optimizer, x[idx].to(p.device, p.dtype, non_blocking=True),
                                           y[idx].to(p.device, non_blocking=True)),
                       p.device, progress, desc)
