"""FFConv2d: a drop-in nn.Conv2d + ReLU that trains itself with Forward-Forward (docs/design.md, "Convolutional FF")."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ._types import ConvGeometry, FFGradOutput, FFStepOutput
from .backends.contract import autocast_gemm_dtype
from .backends.contract_conv import conv_out_size
from .backends.reference_conv import conv_goodness, conv_layer_forward
from .config import FFConfig
from .conv_step import check_step, conv_backend_call
from .labels import check_label_range
from .layer_base import FFLayerBase, check_backend_name, check_num_classes


def _same_padding(kernel_size, dilation, stride) -> tuple:
    """nn.Conv2d's padding='same' where it is symmetric (stride 1, an odd dilated kernel extent)."""
    if stride != (1, 1):
        raise ValueError("ffkernels: padding='same' needs stride 1 (as nn.Conv2d)")
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(f"ffkernels: padding='same' with kernel {kernel_size} and dilation {dilation} pads "
                             "unevenly; give the padding explicitly")
        pads.append(total // 2)
    return tuple(pads)


class FFConv2d(FFLayerBase):
    """``relu(conv2d(norm(x), W, b))`` that trains itself with the Forward-Forward algorithm.

    nn.Conv2d's positional arguments, parameters, shapes and initialization (``from_conv`` copies one; an nn.Conv2d
    state_dict loads). ``norm`` normalizes each input image over C·H·W ("rms", "l2") or not ("none"). The goodness
    sums h**goodness_power (2, or 1: the activity itself) over the whole image (``goodness_over="sample"``), over
    the channels at each location (``"location"``: one goodness per pixel, the loss averaged over them), or, with
    ``loss="competitive"`` and ``num_classes``, over each class's group of out_channels/num_classes channels;
    ``goodness="mean"`` divides by the number of summed elements. Losses: "hinton", "symba", "scff" (``ff_step(x_pos,
    x_neg)``), "competitive" (``ff_step_competitive(x, target)``: cross-entropy of the group goodnesses / temperature,
    no negatives). ``threshold=None``: out_channels for "sum" goodness, 1.0 for "mean"; "scff" as FFLinear's
    (``threshold_neg``, ``scff_lambda``). Optimizer options as FFLinear.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 goodness: str = "mean", goodness_over: Optional[str] = None, goodness_power: int = 2,
                 threshold: Optional[float] = None, loss: str = "hinton", symba_alpha: float = 4.0,
                 threshold_neg: Optional[float] = None, scff_lambda: float = 0.0, num_classes: Optional[int] = None,
                 temperature: float = 1.0, norm: str = "rms", norm_eps: float = 1e-8, optimizer: str = "adam",
                 lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 weight_decay: float = 0.0, backend: str = "auto"):
        super().__init__()
        for nm, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ffkernels: {nm} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"ffkernels: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if padding_mode != "zeros":
            raise ValueError(f"ffkernels: FFConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        check_backend_name(backend)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"ffkernels: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
            padding = (0, 0) if padding == "valid" else _same_padding(self.kernel_size, self.dilation, self.stride)
        self.padding = _pair(padding)
        for nm, v in (("kernel_size", self.kernel_size), ("stride", self.stride), ("dilation", self.dilation),
                      ("padding", self.padding)):
            if any(isinstance(i, bool) or not isinstance(i, int) for i in v) or min(v) < (0 if nm == "padding" else 1):
                raise ValueError(f"ffkernels: {nm} must be {'non-negative' if nm == 'padding' else 'positive'} "
                                 f"int(s), got {v!r}")
        self.padding_mode = padding_mode
        self.num_classes = check_num_classes(loss, num_classes, out_channels, "channel")
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        if goodness_over is None:
            goodness_over = "group" if loss == "competitive" else "sample"
        if threshold is None:
            threshold = FFConfig.default_threshold(goodness, out_channels)
        self.config = FFConfig(goodness=goodness, threshold=threshold, loss=loss, symba_alpha=symba_alpha,
                               threshold_neg=threshold_neg, scff_lambda=scff_lambda, norm=norm,
                               norm_eps=norm_eps, optimizer=optimizer, lr=lr, betas=betas, eps=eps, momentum=momentum,
                               weight_decay=weight_decay, goodness_over=goodness_over, goodness_power=goodness_power,
                               temperature=temperature)
        self._check_options(self.config)
        self.backend_request = backend
        self._finish_init()

    _kernels = "conv_step"

    def _check_options(self, config) -> None:
        if config.peer_norm != 0.0:
            raise ValueError("ffkernels: peer normalization (peer_norm) is for FFLinear; FFConv2d has none")
        if (config.loss == "competitive") != (self.num_classes is not None):
            raise ValueError("ffkernels: loss='competitive' needs the layer built with num_classes (its channel "
                             "groups); construct a new FFConv2d instead of configure(loss=...)")

    @property
    def geometry(self) -> ConvGeometry:
        return ConvGeometry(self.stride, self.padding, self.dilation, self.groups)

    def output_shape(self, input_hw) -> tuple:
        """(out_channels, H_out, W_out) for an input of spatial size ``input_hw``."""
        return (self.out_channels,) + tuple(
            conv_out_size(s, k, st, p, d) for s, k, st, p, d in
            zip(input_hw, self.kernel_size, self.stride, self.padding, self.dilation))

    # ---- construction ------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialization; also resets the optimizer state."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_optimizer_state()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> "FFConv2d":
        """An FFConv2d with the geometry, weights (copied), device and dtype of ``conv``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ffkernels: from_conv takes an nn.Conv2d, got {type(conv).__name__}")
        if isinstance(conv.padding, str):
            raise ValueError("ffkernels: from_conv needs a numeric padding (nn.Conv2d padding='same' is resolved "
                             "by FFConv2d(padding='same') instead)")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, conv.weight.device, conv.weight.dtype,
                    **kwargs)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    # ---- FF training -------------------------------------------------------------------------------

    def ff_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> FFStepOutput:
        """One FF step on positive and negative images (B, C, H, W) (hinton, symba, scff). Returns loss, h_pos, h_neg,
        g_pos, g_neg (with the weights before the update; g (B,) or (B, H_out, W_out) per ``goodness_over``) and
        updates the layer in place; NonFiniteLossError, changing nothing, when the loss is not finite."""
        out = self._step(x_pos, x_neg)
        self._check_finite(out.loss)
        self.step_count += 1
        return out

    def _step(self, x_pos, x_neg) -> FFStepOutput:
        if self.config.loss == "competitive":
            raise ValueError("ffkernels: a layer with loss='competitive' trains with ff_step_competitive(x, target)")
        return conv_backend_call(self, _input(x_pos, "x_pos"), _input(x_neg, "x_neg"), None, self.geometry)[0]

    def ff_step_competitive(self, x: torch.Tensor, target: torch.Tensor) -> FFStepOutput:
        """One step of the competitive loss: cross-entropy of the class groups' goodness / temperature with
        ``target`` (B,), no negatives. Returns FFStepOutput(loss, h, None, g (B, num_classes), None)."""
        out, labels_bad = self._step_competitive(x, target)
        check_step(self, out, labels_bad, target)
        self.step_count += 1
        return out

    def _step_competitive(self, x, target):
        """(``ff_step_competitive`` without the host check, labels_bad): see ``conv_step.conv_backend_call``."""
        if self.config.loss != "competitive":
            raise ValueError(f"ffkernels: ff_step_competitive needs loss='competitive', this layer has "
                             f"loss={self.config.loss!r}")
        return conv_backend_call(self, _input(x, "x"), None, target, self.geometry)

    def ff_grad(self, x_pos: torch.Tensor, x_neg: Optional[torch.Tensor] = None, *,
                target: Optional[torch.Tensor] = None) -> FFGradOutput:
        """The local gradient (and loss, h, g) without updating anything: ``ff_grad(x_pos, x_neg)``, or
        ``ff_grad(x, target=labels)`` for the competitive loss."""
        x_neg = None if x_neg is None else _input(x_neg, "x_neg")
        out, bad = conv_backend_call(self, _input(x_pos, "x_pos"), x_neg, target, self.geometry, update=False)
        if bad is not None and bool(bad):
            check_label_range(torch.as_tensor(target), self.num_classes)
        return out

    # ---- inference (differentiable, like nn.Conv2d + ReLU) --------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled(w.device.type):  # as FFLinear.forward: views, never autocast's cached casts
            w, b = w.view_as(w), (None if b is None else b.view_as(b))
        return conv_layer_forward(x, w, b, self.geometry, self.config.norm, self.config.norm_eps)

    def ff_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's map as its FF steps compute it (under autocast: the convolution in bf16, the bias, ReLU and
        the output in fp32); outside autocast exactly ``self(x)``."""
        gemm = autocast_gemm_dtype(self.weight)
        if gemm == "param":
            return self(x)
        c = self.config
        with torch.autocast(self.weight.device.type, enabled=False):
            return conv_layer_forward(x.to(self.weight.dtype), self.weight, self.bias, self.geometry, c.norm,
                                      c.norm_eps, gemm)

    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        """The goodness of ``x`` as the steps compute it: (B,), (B, H_out, W_out) or (B, num_classes)."""
        return self.goodness_of(self(x))

    def goodness_of(self, h: torch.Tensor) -> torch.Tensor:
        return conv_goodness(h, self.config, self.num_classes or 0)

    def extra_repr(self) -> str:
        c = self.config
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
             + (f", padding={self.padding}" if self.padding != (0, 0) else "")
             + (f", dilation={self.dilation}" if self.dilation != (1, 1) else "")
             + (f", groups={self.groups}" if self.groups != 1 else "")
             + ("" if self.bias is not None else ", bias=False"))
        return (s + f", loss={c.loss!r}, goodness={c.goodness!r}, goodness_over={c.goodness_over!r}, "
                f"goodness_power={c.goodness_power}, "
                + (f"num_classes={self.num_classes}, temperature={c.temperature:g}, " if self.num_classes
                   else f"threshold={c.threshold:g}, ")
                + (f"threshold_neg={c.threshold_neg:g}, scff_lambda={c.scff_lambda:g}, " if c.loss == "scff" else "")
                + f"norm={c.norm!r}, optimizer={c.optimizer!r}, lr={c.lr:g}, backend={self.backend_request!r}")


def _input(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ffkernels: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x.detach().contiguous()
