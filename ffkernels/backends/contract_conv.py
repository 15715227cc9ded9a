"""The checks of the convolutional FF step's inputs (docs/design.md, "Convolutional FF"), shared by every backend.

Like ``contract.py`` (whose parameter and state checks the conv step reuses), every check raises an exception whose
message names the problem, before anything runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._types import dtype_name as _name
from ..config import FFConfig
from .contract import check_label_dtype


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """nn.Conv2d's output size along one dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_conv_weight(weight: Tensor, geom) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.numel() == 0:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"ffkernels: a conv weight must be a non-empty 4-D (out_channels, in_channels/groups, kH, kW) "
                         f"tensor, got {shape}")
    if not weight.is_floating_point():
        raise TypeError(f"ffkernels: weight must be floating point, got {_name(weight.dtype)}")
    if any(s < 1 for s in geom.stride) or any(p < 0 for p in geom.padding) or any(d < 1 for d in geom.dilation):
        raise ValueError(f"ffkernels: stride and dilation must be >= 1 and padding >= 0, got stride={geom.stride}, "
                         f"padding={geom.padding}, dilation={geom.dilation}")
    if geom.groups < 1 or weight.shape[0] % geom.groups:
        raise ValueError(f"ffkernels: groups={geom.groups} must be >= 1 and divide out_channels={weight.shape[0]}")


def check_conv_inputs(x_pos, x_neg, target, weight: Tensor, bias, geom, cfg: FFConfig, num_classes: int,
                      check_range: bool = True) -> tuple:
    """Raise unless the step's inputs fit the layer; return the output's (H_out, W_out).

    x_pos (and x_neg, for the hinton and symba losses) (B, C_in, H, W) on the weight's device and dtype; the
    competitive loss takes no x_neg but ``target`` (B,) integer labels in [0, num_classes), num_classes >= 2
    dividing out_channels into class groups."""
    check_conv_weight(weight, geom)
    c_in = weight.shape[1] * geom.groups
    competitive = cfg.loss == "competitive"
    named = [("x_pos" if not competitive else "x", x_pos)] + ([] if competitive else [("x_neg", x_neg)])
    if competitive and x_neg is not None:
        raise ValueError("ffkernels: the competitive loss has no negatives: pass x_neg=None and the target labels")
    if not competitive and target is not None:
        raise ValueError(f"ffkernels: the {cfg.loss} loss takes positives and negatives, not target labels")
    for nm, x in named:
        if not isinstance(x, Tensor):
            raise TypeError(f"ffkernels: {nm} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"ffkernels: {nm} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != c_in:
            raise ValueError(f"ffkernels: {nm} has {x.shape[1]} channels but the layer takes in_channels={c_in}")
        if x.device != weight.device:
            raise ValueError(f"ffkernels: {nm} is on {x.device} but the layer's weight is on {weight.device}")
        if x.dtype != weight.dtype:
            raise TypeError(f"ffkernels: {nm} has dtype {_name(x.dtype)} but the layer's weight is "
                            f"{_name(weight.dtype)}; convert one of them (e.g. x.to(layer.weight.dtype))")
        if x.shape[0] == 0:
            raise ValueError("ffkernels: the batch is empty (B = 0)")
    if not competitive and x_pos.shape != x_neg.shape:
        raise ValueError(f"ffkernels: x_pos and x_neg must have the same shape, got {tuple(x_pos.shape)} and "
                         f"{tuple(x_neg.shape)}")
    out = tuple(conv_out_size(x_pos.shape[2 + i], weight.shape[2 + i], geom.stride[i], geom.padding[i],
                              geom.dilation[i]) for i in range(2))
    if min(out) < 1:
        raise ValueError(f"ffkernels: the kernel {tuple(weight.shape[2:])} (dilation {geom.dilation}) is larger than "
                         f"the padded input {tuple(x_pos.shape[2:])} + 2*{geom.padding}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype
                             or bias.device != weight.device):
        raise ValueError(f"ffkernels: bias must be a ({weight.shape[0]},) {_name(weight.dtype)} tensor on "
                         f"{weight.device}, got {tuple(bias.shape)} {_name(bias.dtype)} on {bias.device}")
    if cfg.peer_norm != 0.0:
        raise ValueError("ffkernels: peer normalization (peer_norm > 0) is for FFLinear; the conv step has none")
    if competitive:
        check_target(target, x_pos.shape[0], num_classes, weight.shape[0], x_pos.device, check_range)
    return out


def check_target(target, batch: int, num_classes: int, channels: int, device, check_range: bool = True) -> None:
    """The competitive step's labels and class groups; ``check_range``: also read the labels' range (CPU tensors
    only: never a device sync; the layers check it on the device instead, ``conv_step.conv_backend_call``)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"ffkernels: the competitive loss needs num_classes (an int >= 2), got {num_classes!r}")
    if channels % num_classes:
        raise ValueError(f"ffkernels: out_channels={channels} must split into num_classes={num_classes} equal "
                         "channel groups (a multiple of num_classes)")
    if not isinstance(target, Tensor):
        raise TypeError(f"ffkernels: target must be a torch.Tensor of class labels, got {type(target).__name__}")
    check_label_dtype(target, "target")
    if target.shape != (batch,):
        raise ValueError(f"ffkernels: target must have shape ({batch},), one label per image, got {tuple(target.shape)}")
    if target.device != torch.device(device):
        raise ValueError(f"ffkernels: target is on {target.device} but the inputs are on {device}")
    if check_range and target.device.type == "cpu" and batch and bool(((target < 0) | (target >= num_classes)).any()):
        bad = target[(target < 0) | (target >= num_classes)][0].item()
        raise ValueError(f"ffkernels: target labels must be in [0, {num_classes}), got {bad}")


def conv_outputs_like(x_pos: Tensor, x_neg, weight: Tensor, stride, padding, dilation, num_classes: int,
                      options: str) -> tuple:
    """Empty loss, h_pos, h_neg, g_pos, g_neg of the conv ops (their fakes): h (B, C_out, H_out, W_out); g (B,),
    (B, H_out, W_out) or (B, num_classes) by ``goodness_over`` in ``options`` (FFConfig.conv_op_options); h_neg and
    g_neg (0,) without negatives (the competitive loss)."""
    B, C = x_pos.shape[0], weight.shape[0]
    hw = [conv_out_size(x_pos.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2)]
    over = FFConfig.from_op_options(options, conv=True).goodness_over
    g_shape = {"sample": (B,), "location": (B, *hw), "group": (B, num_classes)}[over]
    h_pos, g_pos = x_pos.new_empty((B, C, *hw)), x_pos.new_empty(g_shape)
    h_neg, g_neg = (x_pos.new_empty(0), x_pos.new_empty(0)) if x_neg is None else (x_pos.new_empty((B, C, *hw)),
                                                                                    x_pos.new_empty(g_shape))
    return x_pos.new_empty(()), h_pos, h_neg, g_pos, g_neg
