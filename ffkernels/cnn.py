"""FF CNNs for ``ffkernels train --model cnn`` (docs/design.md, "FF CNNs"): the conv stack built from the options as an
FFNet of conv FF layers (competitive loss: one channel group per class): ``--conv-block bn`` FFConvBlock2d layers (conv,
ReLU, max-pool, BatchNorm), ``plain`` FFConv2d layers with max-pooling between them; and its backprop twin for
``--algo bp``."""
from __future__ import annotations

import argparse

import torch.nn.functional as F
from torch import nn

from .backends.reference_conv import normalize_images
from .cli_options import peek_option, positive_int
from .conv import FFConv2d
from .conv_block import FFConvBlock2d
from .linear import FFLinear
from .net import FFNet

MODELS = ("mlp", "cnn")
CONV_BLOCKS = ("bn", "plain")
# ``--model cnn``'s defaults (over add_arguments'; a dataset's CNN_DATASET_DEFAULTS and explicit flags win)
# (tuned on Fashion-MNIST's validation split, README "FF CNN on Fashion-MNIST"; runs in docs/fashion-mnist/cnn/)
CNN_DEFAULTS = {"loss": "competitive", "conv_block": "bn", "norm": "none", "goodness": "mean",
                "channels": [40, 80, 160, 320], "pool_after": [0, 1, 2],
                "kernel_size": 3, "temperature": 0.15, "goodness_power": 2, "lr": 1e-3, "batch_size": 64,
                "predict_layers": [-2, -1]}
CNN_DATASET_DEFAULTS = {"fashion-mnist": {"jitter": 0, "epochs": 15}}


def add_cnn_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CNN (--model cnn) and the competitive loss")
    g.add_argument("--model", default="mlp", choices=MODELS,
                   help="mlp: FFLinear layers of --hidden widths; cnn: FFConv2d layers of --channels (k x k, padding "
                        "k//2) with 2x2 max-pooling after the --pool-after layers, trained with --loss competitive. "
                        f"--model cnn's defaults: {_flags(CNN_DEFAULTS)}; per dataset: "
                        + "; ".join(f"{name}: {_flags(d)}" for name, d in CNN_DATASET_DEFAULTS.items()))
    g.add_argument("--channels", type=positive_int, nargs="+", default=list(CNN_DEFAULTS["channels"]),
                   help="--model cnn: out_channels of each conv layer (multiples of the number of classes)")
    g.add_argument("--conv-block", default=CNN_DEFAULTS["conv_block"], choices=CONV_BLOCKS,
                   help="--model cnn: bn: each layer is conv, ReLU, 2x2 max-pooling (--pool-after), BatchNorm, with "
                        "the goodness and the next layer's input the BatchNorm output (FFConvBlock2d, CwComp's block); "
                        "plain: conv and ReLU (FFConv2d), the goodness taken before the pooling")
    g.add_argument("--kernel-size", type=positive_int, default=CNN_DEFAULTS["kernel_size"],
                   help="--model cnn: the (odd) kernel size")
    g.add_argument("--pool-after", type=int, nargs="*", default=list(CNN_DEFAULTS["pool_after"]), metavar="L",
                   help="--model cnn: 2x2 max-pooling after these conv layers (0-based)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="--loss competitive: the class-group goodnesses / temperature are the cross-entropy's logits")
    g.add_argument("--goodness-power", type=int, default=2, choices=[1, 2],
                   help="goodness of h**p: 2 (squared activity) or 1 (the activity itself)")
    g.add_argument("--predict-layers", type=int, nargs="+", default=None, metavar="L",
                   help="--loss competitive: the layers whose class-group goodness is summed to predict, negative from "
                        "the end (default: all; --model cnn: -2 -1)")


def _flags(defaults: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in defaults.items())


def model_defaults(argv, dataset: "str | None") -> dict:
    """``--model cnn``'s defaults (and its dataset's) when ``argv`` asks for it, else {}."""
    if peek_option(argv, "--model") != "cnn":
        return {}
    return {**CNN_DEFAULTS, **CNN_DATASET_DEFAULTS.get(dataset, {})}


def check_cnn_options(args, image_shape, num_classes: int) -> None:
    """SystemExit (one line) for a CNN or competitive setup that cannot be built."""
    if args.loss == "competitive" and args.model == "mlp":
        bad = [w for w in args.hidden if w % num_classes]
        if bad:
            raise SystemExit(f"ffkernels train: --loss competitive splits every layer into {num_classes} class groups; "
                             f"--hidden {' '.join(map(str, bad))} is not a multiple of {num_classes}")
    if args.model != "cnn":
        return
    if args.loss != "competitive":
        raise SystemExit("ffkernels train: --model cnn trains with --loss competitive (one channel group per class, "
                         "no negatives); the label-in-input losses need an MLP's first layer")
    if not image_shape or len(image_shape) != 3:
        raise SystemExit("ffkernels train: --model cnn needs an image dataset (its image shape (C, H, W)); this one "
                         "is flat")
    if args.kernel_size % 2 == 0:
        raise SystemExit(f"ffkernels train: --kernel-size must be odd (padding k//2 keeps the size), got "
                         f"{args.kernel_size}")
    bad = [c for c in args.channels if c % num_classes]
    if bad:
        raise SystemExit(f"ffkernels train: --channels {' '.join(map(str, bad))} must be multiples of the "
                         f"{num_classes} classes (one channel group per class)")
    n = len(args.channels)
    if any(not 0 <= i < n for i in args.pool_after):
        raise SystemExit(f"ffkernels train: --pool-after names conv layers 0..{n - 1}, got {args.pool_after}")
    h, w = image_shape[1:]
    for i in range(n):
        if i in args.pool_after:
            h, w = h // 2, w // 2
            if min(h, w) < 1:
                raise SystemExit(f"ffkernels train: pooling after conv layer {i} shrinks the {image_shape[1]}x"
                                 f"{image_shape[2]} image below 1x1; pool less (--pool-after)")
    if args.temperature <= 0:
        raise SystemExit(f"ffkernels train: --temperature must be > 0, got {args.temperature}")


def input_shape(args, ds) -> tuple:
    """The shape one input row has for the net: (C, H, W) for --model cnn, (features,) otherwise."""
    return tuple(ds.image_shape) if args.model == "cnn" else (ds.in_features,)


def build_competitive_net(args, ds) -> FFNet:
    """The FFNet of ``--loss competitive``: the conv stack of --model cnn, or the MLP of --hidden."""
    c = ds.num_classes
    opts = dict(loss="competitive", num_classes=c, goodness=args.goodness, goodness_power=args.goodness_power,
                temperature=args.temperature, norm=args.norm, optimizer=args.optimizer, lr=args.lr,
                momentum=args.momentum, weight_decay=args.weight_decay, backend=args.backend, device=args.device)
    if args.model == "cnn":
        modules = conv_stack(ds.image_shape[0], args.channels, args.kernel_size, args.pool_after, args.conv_block,
                             **opts)
    else:
        dims = [ds.in_features, *args.hidden]
        modules = [FFLinear(a, b, **opts) for a, b in zip(dims[:-1], dims[1:])]
    return FFNet(modules=modules, predict_layers=args.predict_layers)


def conv_stack(in_channels: int, channels, kernel_size: int, pool_after, conv_block: str, **layer_opts) -> list:
    """The modules of a conv FF net (k x k, padding k//2): "bn": FFConvBlock2d layers with pool=2 after the layers of
    ``pool_after`` (else 1); "plain": FFConv2d layers with nn.MaxPool2d(2) after those. ``layer_opts`` go to every
    layer."""
    chans, modules = [in_channels, *channels], []
    for i in range(len(channels)):
        pool = 2 if i in pool_after else 1
        if conv_block == "bn":
            modules.append(FFConvBlock2d(chans[i], chans[i + 1], kernel_size, padding=kernel_size // 2, pool=pool,
                                         **layer_opts))
            continue
        modules.append(FFConv2d(chans[i], chans[i + 1], kernel_size, padding=kernel_size // 2, **layer_opts))
        if pool > 1:
            modules.append(nn.MaxPool2d(pool))
    return modules


def describe_layers(channels, pool_after, conv_block: str) -> str:
    """e.g. ``c40-pool-bn-c80-bn``: each conv layer, ``-pool`` after the pooled ones, ``-bn`` for BatchNorm blocks."""
    bn = "-bn" if conv_block == "bn" else ""
    return "-".join(f"c{c}" + ("-pool" if i in pool_after else "") + bn for i, c in enumerate(channels))


class BPCNN(nn.Module):
    """The backprop twin of ``--model cnn``: the same stack (per-image normalization, conv, ReLU, the same pooling,
    and with ``conv_block="bn"`` a BatchNorm2d after each layer's pooling) plus a linear head on the flattened last
    map, trained end to end with cross-entropy."""

    def __init__(self, image_shape, channels, kernel_size: int, pool_after, num_classes: int, norm: str = "rms",
                 device=None, conv_block: str = "plain"):
        super().__init__()
        chans = [image_shape[0], *channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size, padding=kernel_size // 2, device=device)
                                   for a, b in zip(chans[:-1], chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c, device=device) if conv_block == "bn" else nn.Identity()
                                 for c in channels)
        self.pool_after, self.norm = set(pool_after), norm
        h, w = image_shape[1:]
        for i in range(len(channels)):
            if i in self.pool_after:
                h, w = h // 2, w // 2
        self.head = nn.Linear(channels[-1] * h * w, num_classes, device=device)

    def forward(self, x):
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(conv(normalize_images(x, self.norm, 1e-8)))
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
            x = bn(x)
        return self.head(x.flatten(1))


def net_summary(args, ds) -> str:
    """The header's description of the net."""
    if args.model == "cnn":
        layers = describe_layers(args.channels, args.pool_after, args.conv_block)
        return f"cnn {'x'.join(map(str, ds.image_shape))}-{layers} (k{args.kernel_size})"
    return f"{ds.in_features}-{'-'.join(map(str, args.hidden))}"
