"""FFLinear: a drop-in nn.Linear + ReLU that trains itself with Forward-Forward (docs/design.md, "Public API")."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._types import ConvGeometry, FFGradOutput, FFStepOutput
from .backends import get_backend
from .backends import reference as ref
from .backends.reference_conv import conv_goodness
from .backends.contract import autocast_gemm_dtype, check_ff_inputs
from .config import FFConfig
from .conv_step import check_step, conv_backend_call
from .labels import check_label_range, embed_label_unchecked, labels_out_of_range
from .layer_base import FFLayerBase, check_backend_name, check_num_classes, nan_first_row_if, non_finite_error

_ONE_BY_ONE = ConvGeometry()


def raise_label_range(x, labels_pos, labels_neg, num_classes: int) -> None:
    for labels in (labels_pos, labels_neg):
        check_label_range(torch.as_tensor(labels, device=x.device), num_classes)


class FFLinear(FFLayerBase):
    """``relu(norm(x) @ W.T + b)`` that trains itself with the Forward-Forward algorithm.

    Same parameters, shapes and initialization as ``nn.Linear``; ``ff_step(x_pos, x_neg)`` runs one fused
    step (forward, goodness, local loss, exact local gradient and the optimizer update of W and b) without
    building an autograd graph. The optimizer state and step count live in the module's state_dict.

    ``peer_norm`` = lambda > 0 turns on peer normalization with momentum ``peer_momentum``: the running mean of
    each unit's positive activations is the buffer ``peer_mean`` (in the state_dict; zeros at first), and the
    loss gains lambda times its variance over the units (docs/design.md, "Peer normalization").

    ``loss="competitive"`` (with ``num_classes``) splits the units into one group per class: ``ff_step_competitive(x,
    target)`` trains with the cross-entropy of the group goodnesses, no negatives (docs/design.md, "Convolutional
    FF"; it runs as the conv step of a 1x1 convolution, the same math). ``goodness_power=1`` likewise.

    ``loss="scff"`` (SCFF, Chen et al. 2024) is hinton's loss with the negatives' threshold ``threshold_neg`` (None:
    ``threshold``, once that is resolved) and ``scff_lambda`` |g+| added per pair (docs/design.md, "The math").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 goodness: str = "sum", threshold: Optional[float] = None, loss: str = "hinton",
                 symba_alpha: float = 4.0, threshold_neg: Optional[float] = None, scff_lambda: float = 0.0,
                 norm: str = "rms", norm_eps: float = 1e-8, optimizer: str = "adam",
                 lr: float = 3e-3, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 weight_decay: float = 0.0, peer_norm: float = 0.0, peer_momentum: float = 0.9,
                 num_classes: Optional[int] = None, goodness_power: int = 2, temperature: float = 1.0,
                 backend: str = "auto"):
        super().__init__()
        for nm, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ffkernels: {nm} must be a positive int, got {v!r}")
        check_backend_name(backend)
        self.in_features, self.out_features = in_features, out_features
        self._peer_units = out_features
        self.num_classes = check_num_classes(loss, num_classes, out_features, "unit")
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if threshold is None:
            threshold = FFConfig.default_threshold(goodness, out_features)
        self.config = FFConfig(goodness=goodness, threshold=threshold, loss=loss, symba_alpha=symba_alpha,
                               threshold_neg=threshold_neg, scff_lambda=scff_lambda, norm=norm, norm_eps=norm_eps,
                               optimizer=optimizer, lr=lr, betas=betas, eps=eps, momentum=momentum,
                               weight_decay=weight_decay, peer_norm=peer_norm, peer_momentum=peer_momentum,
                               goodness_power=goodness_power, temperature=temperature,
                               goodness_over="group" if loss == "competitive" else "sample")
        self._check_options(self.config)
        self.backend_request = backend
        self._finish_init()

    @property
    def _kernels(self) -> str:
        return "step" if self.config.is_linear else "conv_step"

    def _check_options(self, config) -> None:
        if config.goodness_over == "location":
            raise ValueError("ffkernels: goodness_over='location' (per pixel) is for FFConv2d; FFLinear's goodness is "
                             "per row ('sample') or per class group (loss='competitive')")
        if (config.loss == "competitive") != (self.num_classes is not None):
            raise ValueError("ffkernels: loss='competitive' needs the layer built with num_classes (its unit groups); "
                             "construct a new FFLinear instead of configure(loss=...)")

    # ---- construction ------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """nn.Linear's initialization; also resets the optimizer state."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_optimizer_state()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "FFLinear":
        """An FFLinear with the weights (copied), shape, device and dtype of ``linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ffkernels: from_linear takes an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    # ---- FF training -------------------------------------------------------------------------------

    def _flatten_inputs(self, x_pos, x_neg):
        for nm, x in (("x_pos", x_pos), ("x_neg", x_neg)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"ffkernels: {nm} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 1:
                raise ValueError(f"ffkernels: {nm} must have shape (..., {self.in_features}), got a scalar")
        if x_pos.shape[:-1] != x_neg.shape[:-1]:
            raise ValueError(f"ffkernels: x_pos and x_neg must have the same batch shape, got "
                             f"{tuple(x_pos.shape)} and {tuple(x_neg.shape)}")
        lead = x_pos.shape[:-1]
        xp = x_pos.detach().reshape(-1, x_pos.shape[-1]).contiguous()
        xn = x_neg.detach().reshape(-1, x_neg.shape[-1]).contiguous()
        check_ff_inputs(xp, xn, self.weight, self.bias)
        return xp, xn, lead

    def ff_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> FFStepOutput:
        """One FF training step on positives ``x_pos`` and negatives ``x_neg`` of shape (..., in_features).

        Returns loss, h_pos, h_neg, g_pos, g_neg (computed with the weights before the update) and updates
        the layer in place. Raises NonFiniteLossError, changing nothing, if the loss is not finite.
        One host sync (reading whether the loss is finite).
        """
        out = self._step(x_pos, x_neg)
        self._check_finite(out.loss)
        self.step_count += 1
        return out

    def _step(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> FFStepOutput:
        """``ff_step`` without the host check: the backend skips the update on the device when the loss is not
        finite; the caller reads the loss and advances ``step_count`` exactly when it is finite."""
        if self.config.loss == "competitive":
            raise ValueError("ffkernels: a layer with loss='competitive' trains with ff_step_competitive(x, target)")
        xp, xn, lead = self._flatten_inputs(x_pos, x_neg)
        if not self.config.is_linear:  # goodness_power=1: the conv step of a 1x1 convolution
            out = self._conv_call(xp, xn, None, update=True)[0]
            return FFStepOutput(out.loss, *(t.reshape(*lead, -1) for t in out[1:3]), out.g_pos.reshape(lead),
                                out.g_neg.reshape(lead))
        w, b = self._param_views()
        backend = get_backend(self.backend)
        with torch.no_grad():
            out = backend.step(xp, xn, w, b, self._states("weight"), self._states("bias") if b is not None else (),
                               self.step_count + 1, self._step_config(backend), peer_mean=self._peer_mean())
        return FFStepOutput(out.loss, out.h_pos.reshape(*lead, -1), out.h_neg.reshape(*lead, -1),
                            out.g_pos.reshape(lead), out.g_neg.reshape(lead))

    def ff_step_labeled(self, x: torch.Tensor, labels_pos: torch.Tensor, labels_neg: torch.Tensor,
                        num_classes: int, value: float = 1.0) -> FFStepOutput:
        """``ff_step(embed_label(x, labels_pos), embed_label(x, labels_neg))`` for Hinton-style supervised FF.

        Positive and negative share every feature but the label slots, so backends that can (``cpu``) compute
        the shared part once: B-row GEMMs instead of 2B-row ones. Others build the pair and call ``ff_step``.
        One host sync (the loss and, where the pair is built here, the labels' range, read together).
        """
        out, labels_bad = self._step_labeled(x, labels_pos, labels_neg, num_classes, value)
        if labels_bad is None:
            self._check_finite(out.loss)
        else:
            bad_labels, bad_loss = torch.stack([labels_bad, ~torch.isfinite(out.loss)]).tolist()
            if bad_labels:
                raise_label_range(x, labels_pos, labels_neg, num_classes)
            if bad_loss:
                raise non_finite_error(out.loss)
        self.step_count += 1
        return out

    def _step_labeled(self, x, labels_pos, labels_neg, num_classes: int, value: float = 1.0, pair: bool = False):
        """(``ff_step_labeled`` without the host check, labels_bad): labels_bad is None when the backend's fused
        labeled step ran (its op checks the labels), else a 0-d bool tensor (labels outside [0, num_classes)) for
        the caller to read; the pair was then built without reading the labels and, with bad labels, made NaN so
        the update is skipped on the device. ``pair=True`` builds the pair whatever the backend."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ffkernels: x must be a torch.Tensor, got {type(x).__name__}")
        backend = get_backend(self.backend)
        fused = None if pair else getattr(backend, "step_labeled", None)
        if fused is None or x.dim() != 2:
            yp = torch.as_tensor(labels_pos, device=x.device)
            yn = torch.as_tensor(labels_neg, device=x.device)
            xp = embed_label_unchecked(x, yp, num_classes, value)
            xn = embed_label_unchecked(x, yn, num_classes, value)
            bad = labels_out_of_range(yp, num_classes) | labels_out_of_range(yn, num_classes)
            return self._step(nan_first_row_if(bad, xp), xn), bad
        check_ff_inputs(x, x, self.weight, self.bias)
        w, b = self._param_views()
        with torch.no_grad():
            out = fused(x.detach(), torch.as_tensor(labels_pos), torch.as_tensor(labels_neg), num_classes,
                        float(value), w, b, self._states("weight"), self._states("bias") if b is not None else (),
                        self.step_count + 1, self._step_config(backend), peer_mean=self._peer_mean())
        return out, None

    def _conv_call(self, xp, xn, target, update: bool):
        """The conv step or gradient of this layer as a 1x1 convolution over (B, in_features, 1, 1)."""
        return conv_backend_call(self, xp.view(*xp.shape, 1, 1), None if xn is None else xn.view(*xn.shape, 1, 1),
                                 target, _ONE_BY_ONE, (*self.weight.shape, 1, 1), update)

    def _flatten_competitive(self, x, target):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"ffkernels: x must be a tensor of shape (..., {self.in_features})")
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
        check_ff_inputs(x2, x2, self.weight, self.bias)
        target = torch.as_tensor(target, device=x.device)
        if target.shape != lead:
            raise ValueError(f"ffkernels: target must have x's batch shape {tuple(lead)}, got {tuple(target.shape)}")
        return x2, target.reshape(-1), lead

    def ff_step_competitive(self, x: torch.Tensor, target: torch.Tensor) -> FFStepOutput:
        """One step of the competitive loss (``loss="competitive"``): the cross-entropy of the class groups' goodness
        (g / temperature as logits) with ``target``; no negatives. Returns FFStepOutput(loss, h, None, g (..., C),
        None) and updates the layer in place; NonFiniteLossError, changing nothing, when the loss is not finite."""
        out, labels_bad = self._step_competitive(x, target)
        check_step(self, out, labels_bad, target)
        self.step_count += 1
        return out

    def _step_competitive(self, x: torch.Tensor, target: torch.Tensor):
        """(``ff_step_competitive`` without the host check, labels_bad): FFNet's sweep reads every loss and the
        labels' range at once (``conv_step.conv_backend_call``)."""
        if self.config.loss != "competitive":
            raise ValueError(f"ffkernels: ff_step_competitive needs loss='competitive', this layer has "
                             f"loss={self.config.loss!r}")
        x2, y, lead = self._flatten_competitive(x, target)
        out, bad = self._conv_call(x2, None, y, update=True)
        return FFStepOutput(out.loss, out.h_pos.reshape(*lead, -1), None, out.g_pos.reshape(*lead, -1), None), bad

    def ff_grad(self, x_pos: torch.Tensor, x_neg: Optional[torch.Tensor] = None, *,
                target: Optional[torch.Tensor] = None) -> FFGradOutput:
        """The local FF gradient (and loss, h, g) without updating anything (see ``ff_update``); the competitive
        loss takes ``ff_grad(x, target=labels)``.

        With peer normalization it reads the running mean peer_mean (the loss and gradient include L_peer) but
        does not update it.
        """
        if self.config.loss == "competitive":
            if x_neg is not None:
                raise ValueError("ffkernels: the competitive loss has no negatives: ff_grad(x, target=labels)")
            x2, y, lead = self._flatten_competitive(x_pos, target)
            out, bad = self._conv_call(x2, None, y, update=False)
            if bool(bad):
                check_label_range(y, self.num_classes)
            return out._replace(h_pos=out.h_pos.reshape(*lead, -1), g_pos=out.g_pos.reshape(*lead, -1))
        if target is not None:
            raise ValueError(f"ffkernels: target is for loss='competitive'; the {self.config.loss} loss takes x_neg")
        if x_neg is None:
            raise ValueError(f"ffkernels: the {self.config.loss} loss needs x_neg")
        xp, xn, lead = self._flatten_inputs(x_pos, x_neg)
        if not self.config.is_linear:
            out = self._conv_call(xp, xn, None, update=False)[0]
            return FFGradOutput(out.loss, *(t.reshape(*lead, -1) for t in out[1:3]), out.g_pos.reshape(lead),
                                out.g_neg.reshape(lead), out.grad_weight, out.grad_bias)
        w, b = self._param_views()
        backend = get_backend(self.backend)
        with torch.no_grad():
            out = backend.grad(xp, xn, w, b, self._step_config(backend), peer_mean=self._peer_mean())
        return FFGradOutput(out.loss, out.h_pos.reshape(*lead, -1), out.h_neg.reshape(*lead, -1),
                            out.g_pos.reshape(lead), out.g_neg.reshape(lead), out.grad_weight, out.grad_bias)

    # ---- inference (differentiable, like nn.Linear + ReLU) -------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled(w.device.type):
            # torch.autocast caches its casts of leaf parameters for the whole autocast region, and the FF steps update
            # the weights in place inside it: cast views (not leaves) instead, so every call sees the current weights
            w, b = w.view_as(w), (None if b is None else b.view_as(b))
        return ref.layer_forward(x, w, b, self.config.norm, self.config.norm_eps)

    def ff_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(norm(x) @ W.T + b)`` as this layer's FF steps compute it: under torch.autocast (float32 weights) the
        GEMM in bf16 (x̂ and W cast, bf16 output) and the bias, ReLU and the output in fp32 (docs/design.md, "Mixed
        precision"); outside autocast exactly ``self(x)``. FFNet's own passes (features, the head's input, goodness
        scores, predict) use it: ``self(x)`` follows autocast like nn.Linear (bf16 out), which costs the head about a
        point of accuracy on mnist5k."""
        gemm = autocast_gemm_dtype(self.weight)
        if gemm == "param":
            return self(x)
        c = self.config
        with torch.autocast(self.weight.device.type, enabled=False):  # ref.linear makes the casts
            return ref.layer_forward(x.to(self.weight.dtype), self.weight, self.bias, c.norm, c.norm_eps, gemm)

    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        """The goodness of ``x`` under the current weights: per row (..., ), or per class group (..., C) for the
        competitive loss."""
        return self.goodness_of(self(x))

    def goodness_of(self, h: torch.Tensor) -> torch.Tensor:
        """The goodness of this layer's activity ``h`` (..., out_features), as its steps compute it."""
        if self.config.is_linear:
            return ref.goodness(h, self.config.goodness)
        g = conv_goodness(h.reshape(-1, h.shape[-1], 1, 1), self.config, self.num_classes or 0)
        return g.reshape(*h.shape[:-1], *g.shape[1:])

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"goodness={c.goodness!r}, threshold={c.threshold:g}, loss={c.loss!r}, "
                + (f"threshold_neg={c.threshold_neg:g}, scff_lambda={c.scff_lambda:g}, " if c.loss == "scff" else "")
                + f"norm={c.norm!r}, "
                f"optimizer={c.optimizer!r}, lr={c.lr:g}, "
                + (f"peer_norm={c.peer_norm:g}, peer_momentum={c.peer_momentum:g}, " if c.peer_norm != 0.0 else "")
                + (f"num_classes={self.num_classes}, temperature={c.temperature:g}, " if self.num_classes else "")
                + (f"goodness_power={c.goodness_power}, " if c.goodness_power != 2 else "")
                + f"backend={self.backend_request!r}")
