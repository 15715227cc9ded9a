"""FFConvBlock2d: CwComp's block (conv, ReLU, max-pool, BatchNorm) trained as one FF layer with the competitive loss
(docs/design.md, "The BatchNorm block").

The goodness of each class's channel group and the next layer's input are both the BatchNorm output. The BatchNorm
couples every image of the batch, so the step's gradient is not the per-image epilogue of the fused conv kernels: it
is computed with torch ops (autograd, on the layer's device, any backend), and the backend's fused optimizer update
applies it (``update`` of the backend that ``backend`` names: the cpu / cuda / triton op, or torch.optim for
``reference``), skipped on the device when the loss is not finite, with no host read.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._types import FFStepOutput
from .backends import get_backend
from .backends.contract import autocast_gemm_dtype
from .backends.reference_conv import conv, conv_goodness, normalize_images
from .conv import FFConv2d, _input
from .conv_step import checked_inputs

_NO_SPLIT = ("ffkernels: FFConvBlock2d has no split ff_grad -> ff_update path (FFGradOutput does not carry its "
             "BatchNorm parameters' gradients and running statistics); train it with ff_step_competitive")


class BlockGrad(NamedTuple):
    loss: torch.Tensor          # 0-d: the cross-entropy of the class groups' goodness / temperature
    h: torch.Tensor             # (B, C, H', W') the BatchNorm output (the goodness's and the next layer's input)
    g: torch.Tensor             # (B, num_classes) the class groups' goodness
    grads: tuple                # d loss / d (weight, bias or None, bn_weight, bn_bias)
    batch_mean: torch.Tensor    # (C,) the pooled activity's batch mean and unbiased variance (the running stats')
    batch_var: torch.Tensor


def block_forward(x, weight, bias, bn_weight, bn_bias, geom, pool: int, norm: str, norm_eps: float, bn_eps: float,
                  running=None, gemm_dtype: str = "param") -> tuple:
    """(relu(conv(norm(x))) max-pooled, its BatchNorm): with the batch's statistics, or ``running`` = (mean, var)."""
    h = F.relu(conv(normalize_images(x, norm, norm_eps), weight, bias, geom, gemm_dtype))
    if pool > 1:
        h = F.max_pool2d(h, pool)
    mean, var = running if running is not None else (None, None)
    return h, F.batch_norm(h, mean, var, bn_weight, bn_bias, training=running is None, eps=bn_eps)


def block_grad(x, target, weight, bias, bn_weight, bn_bias, geom, pool: int, cfg, num_classes: int,
               bn_eps: float) -> BlockGrad:
    """The block's loss and its exact gradient w.r.t. its four parameters (x is a constant), by autograd."""
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):  # the GEMM dtype is cfg.gemm_dtype's
        leaves = [t.detach().requires_grad_(True) for t in (weight, bias, bn_weight, bn_bias) if t is not None]
        w, b, gamma, beta = leaves if bias is not None else (leaves[0], None, *leaves[1:])
        h, y = block_forward(x.detach(), w, b, gamma, beta, geom, pool, cfg.norm, cfg.norm_eps, bn_eps,
                             gemm_dtype=cfg.gemm_dtype)
        g = conv_goodness(y, cfg, num_classes)
        loss = F.cross_entropy(g / cfg.temperature, target)
        grads = list(torch.autograd.grad(loss, leaves))
    if bias is None:
        grads.insert(1, None)
    h = h.detach()
    return BlockGrad(loss.detach(), y.detach(), g.detach(), tuple(grads), h.mean((0, 2, 3)),
                     h.var((0, 2, 3), unbiased=True))


class FFConvBlock2d(FFConv2d):
    """``BatchNorm2d(max_pool2d(relu(conv2d(norm(x), W, b)), pool))`` trained as one FF layer with the competitive
    loss: cross-entropy of the class groups' goodness (mean of y**2 over each group's channels and locations, by
    default) / temperature, where y is the BatchNorm output, which is also what the next layer reads (CwComp's block,
    arXiv 2312.12668).

    FFConv2d's arguments (``loss`` must be "competitive", ``num_classes`` is required; ``norm`` defaults to "none"),
    plus ``pool`` (the max-pooling's kernel and stride; 1: none), ``bn_eps`` and ``bn_momentum`` (nn.BatchNorm2d's).
    The BatchNorm's affine parameters (``bn_weight``, ``bn_bias``) are trained by the same optimizer and options as
    the convolution's; its running mean and variance advance with every finite step, as nn.BatchNorm2d's in training
    mode. ``forward`` (and prediction) use the batch's statistics in training mode, the running ones in eval mode
    (``net.eval()``); only the FF steps update the running ones. ``ff_step_competitive(x, target)`` returns the
    BatchNorm output as h.
    """

    _kept_buffers = ("peer_mean", "running_mean", "running_var", "num_batches_tracked")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 pool: int = 2, bn_eps: float = 1e-5, bn_momentum: float = 0.1, loss: str = "competitive",
                 norm: str = "none", **options):
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"ffkernels: pool must be a positive int (the max-pooling's kernel and stride), "
                             f"got {pool!r}")
        for nm, v, top in (("bn_eps", bn_eps, float("inf")), ("bn_momentum", bn_momentum, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= top:
                raise ValueError(f"ffkernels: {nm} must be a number in (0, {top:g}], got {v!r}")
        self.pool, self.bn_eps, self.bn_momentum = pool, float(bn_eps), float(bn_momentum)  # _finish_init reads them
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype, loss=loss, norm=norm, **options)

    def _finish_init(self) -> None:
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        c = self.out_channels
        self.bn_weight = nn.Parameter(torch.empty(c, **kw))
        self.bn_bias = nn.Parameter(torch.empty(c, **kw))
        self.register_buffer("running_mean", torch.zeros(c, **kw))
        self.register_buffer("running_var", torch.ones(c, **kw))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=kw["device"]))
        super()._finish_init()

    def _params(self):
        return super()._params() + [("bn_weight", self.bn_weight), ("bn_bias", self.bn_bias)]

    def _check_options(self, config) -> None:
        if config.loss != "competitive":
            raise ValueError(f"ffkernels: FFConvBlock2d trains with loss='competitive' only (its BatchNorm couples "
                             f"the batch; no positive/negative pairs), got loss={config.loss!r}")
        if config.goodness_over != "group":
            raise ValueError(f"ffkernels: FFConvBlock2d takes the goodness over each class's channel group, got "
                             f"goodness_over={config.goodness_over!r}")
        super()._check_options(config)

    def reset_parameters(self) -> None:
        """nn.Conv2d's and nn.BatchNorm2d's initialization; also resets the running statistics and the optimizer."""
        super().reset_parameters()
        nn.init.ones_(self.bn_weight)
        nn.init.zeros_(self.bn_bias)
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def output_shape(self, input_hw) -> tuple:
        c, h, w = super().output_shape(input_hw)
        return (c, h // self.pool, w // self.pool)

    # ---- FF training -------------------------------------------------------------------------------

    # ff_step_competitive (FFConv2d's: this step, then the one host read) and ff_step's refusal (FFConv2d's _step: the
    # loss is competitive) are inherited

    def _step_competitive(self, x, target):
        """(the step's FFStepOutput, labels_bad) without a host read: see ``conv_step.conv_backend_call``."""
        backend = get_backend(self.backend)
        cfg = self._step_config(backend)
        w, b = self._param_views()
        x, target, bad = checked_inputs(_input(x, "x"), None, target, w, b, self.geometry, cfg, self.num_classes)
        c, ho, wo = self.output_shape(x.shape[2:])
        if min(ho, wo) < 1:
            raise ValueError(f"ffkernels: pool={self.pool} shrinks the {tuple(x.shape[2:])} input's "
                             f"{tuple(super().output_shape(x.shape[2:])[1:])} map below 1x1")
        if x.shape[0] * ho * wo < 2:
            raise ValueError("ffkernels: BatchNorm needs more than one value per channel: a batch of one image with "
                             "a 1x1 output map")
        r = block_grad(x, target, w, b, self.bn_weight.detach(), self.bn_bias.detach(), self.geometry, self.pool,
                       cfg, self.num_classes, self.bn_eps)
        self._apply_update(r)
        return FFStepOutput(r.loss, r.h, None, r.g, None), bad

    @torch.no_grad()
    def _apply_update(self, r: BlockGrad) -> None:
        """The backend's optimizer update of the four parameters and the running statistics' advance, all skipped
        on the device when the loss is not finite."""
        backend, step, ucfg = get_backend(self.backend), self.step_count + 1, self.config.update_config
        gw, gb, gg, gbeta = r.grads
        w, b = self._param_views()
        flat = (w.shape[0], -1)  # the update op takes 2-D weights
        backend.update(w.view(flat), b, gw.reshape(flat), gb, tuple(t.view(flat) for t in self._states("weight")),
                       self._states("bias") if b is not None else (), step, ucfg, loss=r.loss)
        col = (self.out_channels, 1)
        backend.update(self.bn_weight.detach().view(col), self.bn_bias.detach(), gg.view(col), gbeta,
                       tuple(t.view(col) for t in self._states("bn_weight")), self._states("bn_bias"), step, ucfg,
                       loss=r.loss)
        ok, m = torch.isfinite(r.loss), self.bn_momentum
        self.running_mean.copy_(torch.where(ok, torch.lerp(self.running_mean, r.batch_mean.to(self.running_mean), m),
                                            self.running_mean))
        self.running_var.copy_(torch.where(ok, torch.lerp(self.running_var, r.batch_var.to(self.running_var), m),
                                           self.running_var))
        self.num_batches_tracked.add_(ok.long())

    def ff_grad(self, *args, **kwargs):
        raise NotImplementedError(_NO_SPLIT)

    def ff_update(self, *args, **kwargs):
        raise NotImplementedError(_NO_SPLIT)

    # ---- inference -----------------------------------------------------------------------------------

    def _forward(self, x, weight, bias, gemm_dtype: str = "param") -> torch.Tensor:
        running = None if self.training else (self.running_mean, self.running_var)
        c = self.config
        return block_forward(x, weight, bias, self.bn_weight, self.bn_bias, self.geometry, self.pool, c.norm,
                             c.norm_eps, self.bn_eps, running, gemm_dtype)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output (differentiable): batch statistics in training mode (not recorded), running ones in
        eval mode."""
        return self._forward(x, self.weight, self.bias)

    def ff_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output as the steps compute it (under autocast: the convolution in its GEMM dtype, the rest in
        fp32); outside autocast exactly ``self(x)``."""
        gemm = autocast_gemm_dtype(self.weight)
        if gemm == "param":
            return self(x)
        with torch.autocast(self.weight.device.type, enabled=False):
            return self._forward(x.to(self.weight.dtype), self.weight, self.bias, gemm)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pool={self.pool}, bn_eps={self.bn_eps:g}, bn_momentum={self.bn_momentum:g}"
