"""Whole conv-net training (``ffkernels bench --conv``), FF vs BP, as depth grows: samples/s and peak memory.

The net is the CNN recipe's (``ffkernels train --model cnn``): conv layers of ``channels`` (k x k, padding k//2) with
2x2 max-pooling after the layers of ``pool_after`` (0-based), on images of ``image`` (C, H, W); depth d is its first
d conv layers (the recipe's pooling among them). ``conv_block`` as ``--conv-block`` (the recipe's: "bn").

- ``ff``: ``FFNet(modules=[FFConvBlock2d(..., pool=2 or 1), ...])`` ("bn") or ``FFNet(modules=[FFConv2d, ...,
  nn.MaxPool2d(2), ...])`` ("plain"), every layer with the competitive loss (one channel group per class,
  ``num_classes`` groups) and the layer's defaults, one ``FFNet.ff_step_competitive(x, y)`` per step (every layer's
  step in one sweep, one host read). B images per step, no negatives.
- ``bp``: ``cnn.BPCNN`` with the same conv layers, pooling (and BatchNorm for "bn") plus a linear head, cross-entropy
  and Adam (``bp.make_bp_optimizer``), one ``bp.bp_step`` on the same B images.

Measured as the MLP networks (network.py): the algorithms of a depth timed together with interleaved repeats, the
memory of each configuration alone (on the CPU in a fresh ``network_worker`` process: its peak RSS; and at the
allocator level), above what the process held before the model was built.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..cnn import BPCNN, CNN_DEFAULTS, CONV_BLOCKS, conv_stack, describe_layers
from ..net import FFNet
from .network import DTYPES, _tensor_bytes, bench_depths, bp_step_case

CONV_ALGOS = ("ff", "bp")
CHANNELS = tuple(CNN_DEFAULTS["channels"])      # the CNN recipe's
POOL_AFTER = tuple(CNN_DEFAULTS["pool_after"])
IMAGE = (1, 28, 28)            # MNIST, Fashion-MNIST


def _int_tuple(v, name: str, length=None) -> tuple:
    t = tuple(v)
    if (length is not None and len(t) != length) or not t or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in t):
        raise ValueError(f"ffkernels bench: {name} must be {length or 'some'} non-negative int(s), got {v!r}")
    return t


@dataclass(frozen=True)
class ConvNetConfig:
    """One conv net to train (plain values only: it travels to the memory worker as JSON, ``model`` = "cnn")."""

    algo: str
    depth: int
    batch: int
    channels: tuple = CHANNELS
    image: tuple = IMAGE
    kernel_size: int = 3
    pool_after: tuple = POOL_AFTER
    num_classes: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "auto"
    threads: Optional[int] = None
    model: str = "cnn"
    conv_block: str = CNN_DEFAULTS["conv_block"]

    def __post_init__(self):
        if self.model != "cnn":
            raise ValueError(f"ffkernels bench: a ConvNetConfig's model is 'cnn', got {self.model!r}")
        if self.conv_block not in CONV_BLOCKS:
            raise ValueError(f"ffkernels bench: conv_block is one of {CONV_BLOCKS}, got {self.conv_block!r}")
        if self.algo not in CONV_ALGOS:
            raise ValueError(f"ffkernels bench: a conv net's algo is one of {CONV_ALGOS}, got {self.algo!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ffkernels bench: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for nm in ("depth", "batch", "kernel_size", "num_classes"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ffkernels bench: {nm} must be a positive int, got {v!r}")
        # JSON brings lists: keep tuples, so that configs compare and print alike
        object.__setattr__(self, "channels", _int_tuple(self.channels, "channels"))
        object.__setattr__(self, "image", _int_tuple(self.image, "image (C, H, W)", 3))
        pools = tuple(self.pool_after)
        object.__setattr__(self, "pool_after", _int_tuple(pools, "pool_after") if pools else ())
        if min(self.channels + self.image) < 1:
            raise ValueError(f"ffkernels bench: channels and image sizes must be positive, got {self.channels}, "
                             f"{self.image}")
        if self.depth > len(self.channels):
            raise ValueError(f"ffkernels bench: depth {self.depth} needs {self.depth} conv layers; channels has "
                             f"{len(self.channels)} ({','.join(map(str, self.channels))})")
        bad = [c for c in self.channels if c % self.num_classes]
        if bad:
            raise ValueError(f"ffkernels bench: the competitive loss needs channels that are multiples of the "
                             f"{self.num_classes} classes, got {','.join(map(str, bad))}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"ffkernels bench: kernel_size must be odd (padding k//2 keeps the size), got "
                             f"{self.kernel_size}")
        h, w = self.image[1:]
        if min(h, w) >> len(self.pools) < 1:
            raise ValueError(f"ffkernels bench: {len(self.pools)} 2x2 poolings shrink the {h}x{w} image below 1x1")

    @property
    def pools(self) -> tuple:
        """The 0-based conv layers of this depth followed by 2x2 max-pooling."""
        return tuple(i for i in self.pool_after if i < self.depth)

    def describe(self) -> str:
        """e.g. ``c40-c80-pool-c160-c320-pool (k3)``: the layers of this depth."""
        return describe_layers(self.channels[:self.depth], self.pools, self.conv_block) + f" (k{self.kernel_size})"

    def tiny(self) -> "ConvNetConfig":
        """A tiny model of the same kind (network._warm_runtime)."""
        return replace(self, depth=1, channels=(self.num_classes,))

    def make_batch(self):
        """(x, y): a fixed random batch of ``batch`` images in [0, 1) and labels."""
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(self.batch, *self.image, generator=gen).to(self.device, DTYPES[self.dtype])
        y = torch.randint(0, self.num_classes, (self.batch,), generator=gen).to(self.device)
        return x, y

    def build(self, x: torch.Tensor, y: torch.Tensor):
        """(step, persistent_bytes, backend), as network._build."""
        device, dtype = torch.device(self.device), DTYPES[self.dtype]
        k = self.kernel_size
        if self.algo == "ff":
            net = FFNet(modules=conv_stack(self.image[0], self.channels[:self.depth], k, self.pools, self.conv_block,
                                           loss="competitive", num_classes=self.num_classes, backend=self.backend,
                                           device=device, dtype=dtype))

            def step():
                return net.ff_step_competitive(x, y).losses

            def persistent():  # parameters + optimizer state (and BatchNorm statistics: the layers' buffers)
                return _tensor_bytes(list(net.parameters()) + list(net.buffers()))
            return step, persistent, net.backend

        model = BPCNN(self.image, list(self.channels[:self.depth]), k, list(self.pools), self.num_classes,
                      device=device, conv_block=self.conv_block).to(dtype)
        return bp_step_case(model, x, y)


def bench_conv_network(depths, *, channels, image, batch: int, device, dtype: str, backend: str = "auto",
                       warmup: int, repeats: int, min_time: float, threads=None, progress: bool = True,
                       on_depth=None) -> dict:
    """FF (competitive conv FFNet) and BP (BPCNN) at every depth (the first d layers of ``channels``):
    {"memory_method", "rows", "summary"}, measured as ``network.bench_network`` measures the MLPs."""
    def configs(depth):
        return [ConvNetConfig(algo=a, depth=depth, batch=batch, channels=tuple(channels), image=tuple(image),
                              device=str(device), dtype=dtype, backend=backend, threads=threads) for a in CONV_ALGOS]
    for d in depths:  # a bad depth or channel list fails before anything is measured
        configs(d)
    return bench_depths(depths, configs, device=device, dtype=dtype, warmup=warmup, repeats=repeats,
                        min_time=min_time, progress=progress, on_depth=on_depth, desc="conv networks")
