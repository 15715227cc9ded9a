"""SoftmaxHead: the linear softmax classifier an FFNet can train beside its FF layers (docs/design.md, "The head").

It reads the RMS-normalized activities of some of the net's layers for the input with the neutral label,
concatenated, and is trained with cross-entropy. Its gradient is computed here in closed form on detached
features, so nothing flows into the FF layers; its update is the same fused Adam/SGD update the FF layers
use (the backend's ``update``), with its own options in an FFConfig (only the optimizer fields matter).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._types import NonFiniteLossError
from .backends import get_backend, resolve_backend
from .backends.contract import state_dtype
from .backends.reference import normalize
from .config import FFConfig
from .step_state import extra_state, load_extra_state

FEATURE_EPS = 1e-8  # the head's RMS normalization: h / (sqrt(mean h^2) + FEATURE_EPS)


def rms_features(hs) -> torch.Tensor:
    """The head's input: each activity RMS-normalized along its last dim, concatenated."""
    return torch.cat([normalize(h, "rms", FEATURE_EPS) for h in hs], dim=-1)


class SoftmaxHead(nn.Module):
    """Bias-free Linear(in_features -> num_classes) trained with cross-entropy and its own optimizer.

    ``weight`` (num_classes, in_features) starts at zero (uniform predictions; it draws no random numbers).
    The optimizer state (named as FFLinear's: ``exp_avg_weight``, ``exp_avg_sq_weight`` or
    ``momentum_buffer_weight``), the step count and the options are in the state_dict, so a head built with the
    same options resumes bit for bit. ``configure(lr=...)`` changes options (for schedules).
    """

    def __init__(self, in_features: int, num_classes: int, *, optimizer: str = "adam", lr: float = 1e-3,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for nm, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ffkernels: the head's {nm} must be a positive int, got {v!r}")
        if num_classes < 2:
            raise ValueError(f"ffkernels: the head needs num_classes >= 2, got {num_classes}")
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.zeros(num_classes, in_features, device=device, dtype=dtype))
        self.config = FFConfig(optimizer=optimizer, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                               momentum=momentum)
        self.backend_request = backend
        self.step_count = 0
        self._make_state()

    def _state_names(self):
        return [f"{s}_weight" for s in self.config.state_names]

    def _make_state(self) -> None:
        for name in [n for n in list(self._buffers) if n not in self._state_names()]:
            del self._buffers[name]
        for name in self._state_names():
            self.register_buffer(name, torch.zeros_like(self.weight, dtype=state_dtype(self.weight.dtype)))

    def reset_optimizer_state(self) -> None:
        for name in self._state_names():
            getattr(self, name).zero_()
        self.step_count = 0

    def configure(self, **options) -> "SoftmaxHead":
        """Change optimizer options (``lr``, ``weight_decay``, ...); a new optimizer kind resets the state."""
        old = self.config.state_names
        self.config = self.config.replace(**options)
        if self.config.state_names != old:
            self._make_state()
            self.step_count = 0
        return self

    @property
    def backend(self) -> str:
        return resolve_backend(self.backend_request, self.weight.device, self.weight.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (..., num_classes) of given features (differentiable, like nn.Linear without bias)."""
        return features @ self.weight.t()

    @torch.no_grad()
    def step(self, features: torch.Tensor, labels: torch.Tensor,
             logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One cross-entropy step on (B, in_features) features; returns the mean loss before the update.

        ``logits``: this head's logits of ``features`` if already computed (they are not recomputed). The
        gradient (softmax - one-hot)^T features / B is one (C, B) x (B, D) GEMM; the update is the backend's
        fused Adam/SGD. A non-finite loss raises NonFiniteLossError and changes nothing (one host sync).
        """
        loss = self._step(features, labels, logits)
        if not bool(torch.isfinite(loss)):
            self._raise_non_finite(loss)
        self.step_count += 1
        return loss.to(self.weight.dtype)

    @torch.no_grad()
    def _step(self, features, labels, logits=None, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``step`` without the host check (FFNet reads it with the FF layers' losses, in one sync): the update is
        skipped on the device when the loss is not finite, or when the 0-d bool ``gate`` is False. Returns the
        loss in fp32 (fp64 for fp64 heads); the caller advances ``step_count`` exactly when the update ran."""
        f = features.detach()
        z = self(f) if logits is None else logits.detach()
        logp = torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
        y = torch.as_tensor(labels, device=z.device).long().reshape(-1, 1)
        loss = -logp.gather(1, y).mean()
        dz = logp.exp_()
        dz.scatter_add_(1, y, torch.full_like(y, -1, dtype=dz.dtype))
        grad = ((dz.t() / f.shape[0]).to(f.dtype) @ f).to(self.weight.dtype)  # autocast's bf16 GEMM: widened
        w = self.weight.detach()
        guard = loss if gate is None else torch.where(gate, loss, torch.full_like(loss, float("nan")))
        get_backend(self.backend).update(w, None, grad, None, tuple(getattr(self, n) for n in self._state_names()),
                                         (), self.step_count + 1, self.config, loss=guard)
        return loss

    def _raise_non_finite(self, loss: torch.Tensor) -> None:
        raise NonFiniteLossError(f"ffkernels: the head's cross-entropy is not finite ({loss.item()}); its "
                                 "weights and optimizer state were left unchanged")

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, optimizer={c.optimizer!r}, "
                f"lr={c.lr:g}, weight_decay={c.weight_decay:g}")

    def get_extra_state(self):
        return extra_state(self)

    def set_extra_state(self, state) -> None:
        load_extra_state(self, state, "head")

    def _apply(self, fn, recurse=True):
        saved = {n: self._buffers.pop(n) for n in self._state_names()}
        super()._apply(fn, recurse)
        for n, buf in saved.items():
            self._buffers[n] = buf.to(device=self.weight.device, dtype=state_dtype(self.weight.dtype))
        return self
