"""The oracle of the convolutional FF step (docs/design.md, "Convolutional FF"): autograd + torch.optim.

Written as plainly as the linear oracle in ``reference.py``, whose normalization, pair losses and optimizer it reuses:
x (B, C, H, W) normalized per image, z = conv2d(x̂, W, b), h = relu(z), one goodness per image, per location or per
class group, and the hinton, symba, scff or competitive (cross-entropy over the class groups) loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._types import FFGradOutput, FFStepOutput
from ..config import FFConfig
from .reference import ff_loss, normalize, optimizer_update


def normalize_images(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Per-image normalization: ``reference.normalize`` of each image flattened over C·H·W."""
    return normalize(x.flatten(1), norm, eps).view_as(x)


def conv(x_hat: torch.Tensor, weight: torch.Tensor, bias, geom, gemm_dtype: str = "param") -> torch.Tensor:
    """z = conv2d(x̂, W) + b. With ``gemm_dtype`` "bfloat16"/"float16" (a step under torch.autocast) x̂ and W are cast
    to it and convolved in it (fp32 accumulation, output rounded to it), widened, and b added in x̂'s dtype, as
    ``reference.linear`` does for the GEMM."""
    args = (geom.stride, geom.padding, geom.dilation, geom.groups)
    if gemm_dtype == "param":
        return F.conv2d(x_hat, weight, bias, *args)
    low = getattr(torch, gemm_dtype)
    with torch.autocast(x_hat.device.type, enabled=False):
        z = F.conv2d(x_hat.to(low), weight.to(low), None, *args).to(x_hat.dtype)
    return z if bias is None else z + bias.view(1, -1, 1, 1)


def conv_layer_forward(x, weight, bias, geom, norm: str, eps: float, gemm_dtype: str = "param") -> torch.Tensor:
    """h = relu(conv(normalize_images(x)))."""
    return F.relu(conv(normalize_images(x, norm, eps), weight, bias, geom, gemm_dtype))


def conv_goodness(h: torch.Tensor, cfg: FFConfig, num_classes: int = 0) -> torch.Tensor:
    """g = s · Σ h^p over: the whole image ("sample": (B,)), the channels at each location ("location": (B, H, W)),
    each class's channel group ("group": (B, G), G = num_classes consecutive groups of C/G channels). s = 1 ("sum")
    or 1 / (the number of summed elements) ("mean")."""
    a = h.pow(2) if cfg.goodness_power == 2 else h
    if cfg.goodness_over == "sample":
        a = a.flatten(1)
    elif cfg.goodness_over == "location":
        a = a.movedim(1, -1)
    else:
        a = a.reshape(a.shape[0], num_classes, -1)
    return a.sum(-1) if cfg.goodness == "sum" else a.mean(-1)


def conv_loss(g_pos: torch.Tensor, g_neg, target, cfg: FFConfig) -> torch.Tensor:
    """hinton, symba and scff: the linear loss (``reference.ff_loss``), over every goodness value (per image or per
    location) as a pair; competitive: the mean over images of the cross-entropy of g / temperature with the target
    class."""
    if cfg.loss == "competitive":
        return F.cross_entropy(g_pos / cfg.temperature, target)
    return ff_loss(g_pos, g_neg, cfg)


def conv_objective(x_pos, x_neg, target, weight, bias, geom, cfg: FFConfig, num_classes: int = 0) -> FFStepOutput:
    """Loss, h and g of one conv FF layer, differentiable w.r.t. weight and bias only (the inputs are constants).
    pos||neg go through one convolution, as the kernels do; competitive steps have no negatives (h_neg, g_neg None)."""
    xs = [x_pos.detach()] + ([] if x_neg is None else [x_neg.detach()])
    x_hat = normalize_images(torch.cat(xs), cfg.norm, cfg.norm_eps)
    h = F.relu(conv(x_hat, weight, bias, geom, cfg.gemm_dtype))
    h_pos, h_neg = (h, None) if x_neg is None else h.split(x_pos.shape[0])
    g_pos = conv_goodness(h_pos, cfg, num_classes)
    g_neg = None if h_neg is None else conv_goodness(h_neg, cfg, num_classes)
    return FFStepOutput(conv_loss(g_pos, g_neg, target, cfg), h_pos, h_neg, g_pos, g_neg)


def conv_grad(x_pos, x_neg, target, weight, bias, geom, cfg: FFConfig, num_classes: int = 0) -> FFGradOutput:
    """The exact local gradient of the conv FF loss w.r.t. weight and bias, by autograd."""
    with torch.enable_grad():
        w = weight.detach().requires_grad_(True)
        b = bias.detach().requires_grad_(True) if bias is not None else None
        out = conv_objective(x_pos, x_neg, target, w, b, geom, cfg, num_classes)
        grads = torch.autograd.grad(out.loss, [w] + ([b] if b is not None else []))
    detach = [None if t is None else t.detach() for t in out]
    return FFGradOutput(*detach, grads[0], grads[1] if b is not None else None)


def conv_step(x_pos, x_neg, target, weight, bias, st_w, st_b, step, geom, cfg: FFConfig,
              num_classes: int = 0) -> FFStepOutput:
    """``conv_grad``, then torch.optim's update unless the loss is not finite (one host read)."""
    g = conv_grad(x_pos, x_neg, target, weight, bias, geom, cfg, num_classes)
    if bool(torch.isfinite(g.loss)):
        triples = [(weight, g.grad_weight, st_w)] + ([(bias, g.grad_bias, st_b)] if bias is not None else [])
        params, grads, states = (list(t) for t in zip(*triples))
        optimizer_update(params, grads, states, step, cfg)
    return FFStepOutput(*g[:5])
