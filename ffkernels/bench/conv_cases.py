"""The conv layer cases (``ffkernels bench --conv``): one FFConv2d step of each kind on the same shape, and the
convolution floor under them.

A conv shape ``LOSS:BxCxHxW:N`` (``kKpP`` appended for another kernel or padding than 3x3, padding 1) is one layer
``C -> N`` channels, k x k, stride 1, fed ``B`` real images of C x H x W. For the ``competitive`` loss the FF step takes
the B images once (no negatives, class-group goodness over ``NUM_CLASSES`` groups); for ``hinton`` it takes B
positives + B negatives (2B images, sample goodness). Every case processes those B real images once per call, so
time per real image is ``time / B`` for all of them:

- ``fused-<backend>``: the backend's fused ``conv_step`` on an FFConv2d's weight, bias and optimizer state (its init,
  its defaults: mean goodness, Adam), called as ``conv_step.conv_backend_call`` calls it, without the layer's host
  read of the loss (as the linear fused cases).
- ``reference``: the ``reference`` backend's conv step (autograd over ``reference_conv`` + torch.optim).
- ``bp-dx``: a backprop step of the same conv (per-image normalization, nn.Conv2d, ReLU) on the B images as a
  *hidden* layer: forward, backward with the gradient w.r.t. its input, and Adam (``bp.make_bp_optimizer``). Loss:
  the sum of squared outputs over B (no head).
- ``floor``: what no conv FF step can avoid: ATen's convolution forward over the FF images (2B for hinton, B for
  competitive), ATen's weight-gradient convolution over them (``convolution_backward``, weight only), and the
  optimizer's pass over the weight and bias (the ``update`` of the first fused conv backend: the ff_update op on the
  cpu; torch's Adam where no fused conv backend is measured). No normalization, no epilogue, no bias gradient.

With ``--precision bf16`` (float32 parameters) also ``fused-<backend>-bf16`` (the fused step under
``torch.autocast(dtype=bfloat16)``: bf16 convolutions, fp32 weights, state and epilogue) and ``floor-bf16`` (the two
convolutions on bf16 operands, the weight gradient widened to fp32, and the same optimizer pass over the fp32
parameters), which the bf16 cases' "x floor" refers to.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import bp
from .._types import ConvGeometry
from ..backends import BACKENDS
from ..backends.contract import autocast_config
from ..backends.reference_conv import normalize_images
from ..config import FFConfig
from ..conv import FFConv2d
from ..cnn import CNN_DEFAULTS
from .cases import NUM_CLASSES, _under_autocast, fused_backends, has_bf16_gemms, step_tensors

def _recipe_shapes(batch: int = 64, image=(1, 28, 28)) -> str:
    """The CNN recipe's layers (cnn.CNN_DEFAULTS: channels, k x k with padding k//2, 2x2 pooling after pool_after), each
    with the competitive loss (B images) and the hinton loss (B + B), then issue 19's 64 -> 128 at 14x14, 128 + 128."""
    k, chans = CNN_DEFAULTS["kernel_size"], [image[0], *CNN_DEFAULTS["channels"]]
    h, w, out = image[1], image[2], []
    for i in range(len(chans) - 1):
        for loss in ("competitive", "hinton"):
            out.append(f"{loss}:{batch}x{chans[i]}x{h}x{w}:{chans[i + 1]}k{k}p{k // 2}")
        if i in CNN_DEFAULTS["pool_after"]:
            h, w = h // 2, w // 2
    return ",".join(out + ["hinton:128x64x14x14:128"])


CONV_SHAPES = _recipe_shapes()
CONV_QUICK_SHAPES = "competitive:4x1x8x8:10,hinton:4x10x6x6:20"
LOSSES = ("competitive", "hinton")
_SHAPE_RE = re.compile(r"\s*([a-z]+):(\d+)x(\d+)x(\d+)x(\d+):(\d+)(?:k(\d+))?(?:p(\d+))?\s*")


@dataclass(frozen=True)
class ConvShape:
    """One conv layer ``in_channels -> out_channels`` (kernel x kernel, stride 1, zero padding) fed ``batch`` real
    images of in_channels x height x width, trained with ``loss``."""

    loss: str
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: int = 3
    padding: int = 1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"ffkernels bench: a conv shape's loss is one of {', '.join(LOSSES)}, got {self.loss!r}")
        for nm in ("batch", "in_channels", "height", "width", "out_channels", "kernel", "padding"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if nm == "padding" else 1):
                raise ValueError(f"ffkernels bench: {nm} must be a {'non-negative' if nm == 'padding' else 'positive'} "
                                 f"int, got {v!r}")
        if self.loss == "competitive" and self.out_channels % NUM_CLASSES:
            raise ValueError(f"ffkernels bench: the competitive loss splits the {self.out_channels} out_channels into "
                             f"{NUM_CLASSES} class groups; use a multiple of {NUM_CLASSES} (or the hinton loss)")
        if min(self.output_hw) < 1:
            raise ValueError(f"ffkernels bench: a {self.kernel}x{self.kernel} kernel is larger than the padded "
                             f"{self.height}x{self.width} input")

    @classmethod
    def parse(cls, text: str) -> "ConvShape":
        m = _SHAPE_RE.fullmatch(text)
        if not m:
            raise ValueError(f"ffkernels bench: a conv shape is LOSS:BxCxHxW:N[kK][pP] (loss competitive or hinton, "
                             f"B images of C x H x W, N out_channels, kernel K (3), padding P (1); e.g. "
                             f"competitive:64x1x28x28:40), got {text!r}")
        loss, *numbers = m.groups()
        b, c, h, w, n = (int(v) for v in numbers[:5])
        k = int(numbers[5]) if numbers[5] is not None else 3
        p = int(numbers[6]) if numbers[6] is not None else 1
        return cls(loss, b, c, h, w, n, k, p)

    def __str__(self) -> str:
        return (f"{self.loss}:{self.batch}x{self.in_channels}x{self.height}x{self.width}:{self.out_channels}"
                f"k{self.kernel}p{self.padding}")

    @property
    def output_hw(self) -> tuple:
        return tuple(s + 2 * self.padding - self.kernel + 1 for s in (self.height, self.width))

    @property
    def ff_images(self) -> int:
        """Images one FF step convolves: B for the competitive loss, B positives + B negatives for hinton."""
        return self.batch if self.loss == "competitive" else 2 * self.batch

    @property
    def num_classes(self) -> int:
        """What the conv step is passed: the class groups (competitive), 0 otherwise."""
        return NUM_CLASSES if self.loss == "competitive" else 0

    @property
    def geometry(self) -> ConvGeometry:
        return ConvGeometry((1, 1), (self.padding, self.padding), (1, 1), 1)


def parse_conv_shapes(text: str) -> list:
    shapes = [ConvShape.parse(s) for s in text.split(",") if s.strip()]
    if not shapes:
        raise ValueError(f"ffkernels bench: no conv shapes given in {text!r}")
    return shapes


def conv_flops(shape: ConvShape, images: int) -> int:
    """FLOPs of one convolution over ``images`` images (2 per multiply-add); the weight gradient has as many."""
    h, w = shape.output_hw
    return 2 * images * shape.out_channels * shape.in_channels * shape.kernel ** 2 * h * w


@dataclass(frozen=True)
class ConvCase:
    """A way to take one conv layer step on B real images. ``build`` returns the step (a no-argument callable)."""

    name: str
    kind: str            # "fused", "reference", "bp", "floor"
    backend: "str | None"
    build: Callable[[ConvShape, torch.device, torch.dtype], Callable[[], object]]
    precision: str = "fp32"  # bf16: the step runs under torch.autocast(dtype=bfloat16); compared with floor-bf16

    def images(self, shape: ConvShape) -> int:
        """Images convolved per call: the FF images for FF and the floor, B for BP."""
        return shape.batch if self.kind == "bp" else shape.ff_images


def _rand(*size, device, dtype, generator):
    return torch.rand(*size, generator=generator).to(device=device, dtype=dtype)


def _conv_inputs(shape: ConvShape, device, dtype):
    """(x_pos, x_neg, target): B images in [0, 1); B more as negatives (hinton) or B labels (competitive)."""
    gen = torch.Generator().manual_seed(0)
    size = (shape.batch, shape.in_channels, shape.height, shape.width)
    x_pos = _rand(*size, device=device, dtype=dtype, generator=gen)
    if shape.loss == "competitive":
        return x_pos, None, torch.randint(0, NUM_CLASSES, (shape.batch,), generator=gen).to(device)
    return x_pos, _rand(*size, device=device, dtype=dtype, generator=gen), None


def _conv_layer_tensors(shape: ConvShape, backend: str, device, dtype):
    """An FFConv2d's parameters and optimizer-state buffers (its init, its defaults) for calling a step on them
    directly: (weight, bias, states of weight, states of bias, config)."""
    return step_tensors(FFConv2d(shape.in_channels, shape.out_channels, shape.kernel, padding=shape.padding,
                                 loss=shape.loss, num_classes=NUM_CLASSES if shape.loss == "competitive" else None,
                                 backend=backend, device=device, dtype=dtype))


def _build_conv_step(backend: str):
    def build(shape: ConvShape, device, dtype):
        w, b, st_w, st_b, cfg = _conv_layer_tensors(shape, backend, device, dtype)
        x_pos, x_neg, target = _conv_inputs(shape, device, dtype)
        conv_step, geom, num_classes = BACKENDS[backend].conv_step, shape.geometry, shape.num_classes
        count = [0]

        def step():  # the call of conv_step.conv_backend_call, without the layer's host read of the loss
            count[0] += 1
            with torch.no_grad():  # autocast_config: the GEMM dtype of an enclosing torch.autocast, as FFConv2d's
                return conv_step(x_pos, x_neg, target, w, b, st_w, st_b, count[0], geom, num_classes,
                                 autocast_config(cfg, w))
        return step
    return build


def _build_bp_dx(shape: ConvShape, device, dtype):
    cfg = FFConfig()  # FFConv2d's default normalization, so both layers normalize alike
    conv = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, padding=shape.padding, device=device,
                     dtype=dtype)
    optimizer = bp.make_bp_optimizer(conv)
    x = _conv_inputs(shape, device, dtype)[0].requires_grad_(True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        h = F.relu(conv(normalize_images(x, cfg.norm, cfg.norm_eps)))
        loss = h.square().sum() / shape.batch
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def _build_floor(backend: "str | None", low: bool = False):
    """The floor over fp32 parameters; ``low``: its two convolutions on bf16 operands (floor-bf16)."""
    def build(shape: ConvShape, device, dtype):
        gen = torch.Generator().manual_seed(0)
        op_dtype = torch.bfloat16 if low else dtype
        x = _rand(shape.ff_images, shape.in_channels, shape.height, shape.width, device=device, dtype=op_dtype,
                  generator=gen)
        w, b, st_w, st_b, cfg = _conv_layer_tensors(shape, backend or "reference", device, dtype)
        w_op = w.to(op_dtype) if low else w  # bf16: one fixed operand (the fused step casts W once per step)
        grad_b = torch.rand_like(b)
        geom = shape.geometry
        conv_args = (list(geom.stride), list(geom.padding), list(geom.dilation), False, [0, 0], geom.groups)
        w2 = w.view(w.shape[0], -1)  # the update op's 2-D view of the weight and its state, as the conv step's
        st_w2 = tuple(s.view_as(w2) for s in st_w)
        # the optimizer keys only: the update op reads no loss option (the linear ops' parser refuses competitive)
        update_cfg = cfg.replace(loss="hinton", goodness_over="sample", goodness_power=2)
        count = [0]
        if backend is None:  # torch's own Adam (foreach=False: one pass per tensor)
            adam = torch.optim.Adam([w, b], lr=cfg.lr, foreach=False)

        def step():
            z = torch.ops.aten.convolution(x, w_op, None, *conv_args)
            grad_w = torch.ops.aten.convolution_backward(z, x, w_op, None, *conv_args, [False, True, False])[1]
            if low:
                grad_w = grad_w.to(dtype)
            count[0] += 1
            if backend is None:
                w.grad, b.grad = grad_w, grad_b
                adam.step()
            else:
                BACKENDS[backend].update(w2, b, grad_w.view_as(w2), grad_b, st_w2, st_b, count[0], update_cfg)
        return step
    return build


REFERENCE = ConvCase("reference", "reference", None, _build_conv_step("reference"))
BP_DX = ConvCase("bp-dx", "bp", None, _build_bp_dx)


def fused_conv_case(backend: str) -> ConvCase:
    return ConvCase(f"fused-{backend}", "fused", backend, _build_conv_step(backend))


def fused_conv_bf16_case(backend: str) -> ConvCase:
    return ConvCase(f"fused-{backend}-bf16", "fused", backend, _under_autocast(_build_conv_step(backend)),
                    precision="bf16")


def floor_case(backends) -> ConvCase:
    """The floor, its optimizer pass by the first measured fused conv backend's update (torch's Adam without one)."""
    return ConvCase("floor", "floor", None, _build_floor(next(iter(backends), None)))


def floor_bf16_case(backends) -> ConvCase:
    return ConvCase("floor-bf16", "floor", None, _build_floor(next(iter(backends), None), low=True), precision="bf16")


def has_conv_step(backend: str) -> bool:
    """Whether ``backend`` has the fused conv FF step (docs/design.md, "Convolutional FF")."""
    return callable(getattr(BACKENDS[backend], "conv_step", None))


def conv_backends(device, dtype, requested=None):
    """(backends to measure, [(backend, why skipped)]) for fused conv steps on ``device`` and ``dtype``: those of
    ``fused_backends`` that have a conv step. A requested backend without one raises ValueError."""
    if requested is not None:
        bad = [b for b in requested if b in BACKENDS and b != "reference" and not has_conv_step(b)]
        if bad:
            raise ValueError(f"ffkernels bench: backend(s) {', '.join(map(repr, bad))} have no conv FF kernels "
                             f"(--conv); those that do: "
                             f"{', '.join(repr(b) for b in BACKENDS if b != 'reference' and has_conv_step(b))}")
    chosen, skipped = fused_backends(device, dtype, requested)
    skipped += [(b, "no conv FF kernels") for b in chosen if not has_conv_step(b)]
    return [b for b in chosen if has_conv_step(b)], skipped


def conv_layer_cases(backends, bf16: bool = False) -> list:
    """The cases: fused per backend, reference, bp-dx, floor (in that order); with ``bf16`` then fused-<b>-bf16 per
    backend with bf16 GEMMs, and floor-bf16."""
    cases = [fused_conv_case(b) for b in backends] + [REFERENCE, BP_DX, floor_case(backends)]
    if bf16:
        low = [b for b in backends if has_bf16_gemms(b)]
        cases += [fused_conv_bf16_case(b) for b in low] + [floor_bf16_case(low)]
    return cases
