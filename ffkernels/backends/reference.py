"""The ``reference`` backend: Forward-Forward with autograd and ``torch.optim``, on any device and dtype.

This is the oracle every backend is checked against, written as plainly as possible from the math in
docs/design.md. It builds autograd graphs and is not fast: it is meant to be obviously right.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._types import FFGradOutput, FFStepOutput, NonFiniteLossError
from ..config import FFConfig
from .contract import check_peer_mean, state_dtype


def row_divisor(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """(…, 1): the per-row divisor d of the normalization, x̂ = x / d: "l2" ||x|| + eps, "rms" sqrt(mean x^2) + eps
    (not defined for "none", where x̂ = x)."""
    if norm == "l2":
        return x.norm(dim=-1, keepdim=True) + eps
    if norm == "rms":
        return x.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps
    raise ValueError(f"ffkernels: norm {norm!r} has no row divisor")


def normalize(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Row-wise input normalization: "l2" x/(||x||+eps), "rms" x/(sqrt(mean x^2)+eps), "none" x."""
    if norm == "none":
        return x
    if norm not in ("l2", "rms"):
        raise ValueError(f"ffkernels: unknown norm {norm!r}")
    return x / row_divisor(x, norm, eps)


def linear(x_hat: torch.Tensor, weight: torch.Tensor, bias, gemm_dtype: str = "param") -> torch.Tensor:
    """z = x̂ Wᵀ + b. ``gemm_dtype`` "bfloat16"/"float16" (an FF step under torch.autocast; docs/design.md, "Mixed
    precision"): x̂ and W cast to it, their product in it (fp32 accumulation, the output rounded to it, as autocast's
    mm does), then widened back and the bias added in x̂'s dtype. By autograd, dL/dz is rounded to the low dtype
    (the backward of the widening) for the weight gradient's GEMM, whose output is rounded to it and widened
    (the backward of W's cast); the bias gradient sums dL/dz in x̂'s dtype. The FF step makes one such call over
    pos||neg (``ff_objective_peer``): two calls would sum two rounded halves of dW in the low dtype, which cancel."""
    if gemm_dtype == "param":
        return F.linear(x_hat, weight, bias)
    low = getattr(torch, gemm_dtype)
    with torch.autocast(x_hat.device.type, enabled=False):  # exactly these casts, whatever autocast is around
        z = F.linear(x_hat.to(low), weight.to(low)).to(x_hat.dtype)
    return z if bias is None else z + bias


def layer_forward(x: torch.Tensor, weight: torch.Tensor, bias, norm: str, eps: float,
                  gemm_dtype: str = "param") -> torch.Tensor:
    """h = relu(norm(x) W^T + b) (``linear`` for the GEMM dtype)."""
    return F.relu(linear(normalize(x, norm, eps), weight, bias, gemm_dtype))


def goodness(h: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row goodness: "sum" sum_j h_j^2, "mean" mean_j h_j^2."""
    sq = h.pow(2)
    return sq.sum(dim=-1) if kind == "sum" else sq.mean(dim=-1)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) exactly: unlike F.softplus, no linearization above x = 20 (its gradient is sigmoid(x))."""
    return torch.logaddexp(x, torch.zeros_like(x))


def ff_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, cfg: FFConfig) -> torch.Tensor:
    """The FF loss of a batch from the goodness of its positive and negative rows (each element of g_pos paired with
    the same one of g_neg: a row, or a conv layer's image or location). hinton: softplus(θ − g⁺) + softplus(g⁻ − θ)
    per pair; scff: softplus(θ₊ − g⁺) + softplus(g⁻ − θ₋) + λ|g⁺| (hinton's sums with θ₋, the penalty only where
    λ ≠ 0); both over 2 · the number of pairs. symba: the mean of softplus(−α (g⁺ − g⁻))."""
    if cfg.loss in ("hinton", "scff"):
        scff = cfg.loss == "scff"
        theta_neg = cfg.threshold_neg if scff else cfg.threshold
        total = softplus(cfg.threshold - g_pos).sum() + softplus(g_neg - theta_neg).sum()
        if scff and cfg.scff_lambda != 0.0:
            total = total + cfg.scff_lambda * g_pos.abs().sum()
        return total / (2 * g_pos.numel())
    return softplus(-cfg.symba_alpha * (g_pos - g_neg)).mean()


def peer_objective(z_pos: torch.Tensor, h_pos: torch.Tensor, peer_mean: torch.Tensor, cfg: FFConfig):
    """Peer normalization (docs/design.md): L_peer and the new running mean r', differentiable through z_pos.

    h_st has the value relu(z) and the gradient 1 everywhere (straight-through for this term only, so units
    that are off in the whole batch still get it); m = mean over the positive rows of h_st;
    r' = mu r + (1 - mu) m; L_peer = lambda * mean_j (r'_j - mean(r'))^2. r (``peer_mean``) is a constant.
    """
    h_st = z_pos - (z_pos - h_pos).detach()
    m = h_st.to(peer_mean.dtype).mean(dim=0)  # in the state dtype (fp32 for fp16/bf16 layers)
    r_new = cfg.peer_momentum * peer_mean.detach() + (1.0 - cfg.peer_momentum) * m
    return cfg.peer_norm * ((r_new - r_new.mean()) ** 2).mean(), r_new


def ff_objective_peer(x_pos, x_neg, weight, bias, cfg: FFConfig, peer_mean=None):
    """(FFStepOutput, r'): loss (L_ff + L_peer), activations and goodness of one FF layer, differentiable
    w.r.t. weight and bias only, and the new peer running mean r' (None when cfg.peer_norm == 0)."""
    if not cfg.is_linear:
        raise ValueError(f"ffkernels: the linear FF step computes sample goodness of h**2 with the hinton, symba or "
                         f"scff loss; loss={cfg.loss!r}, goodness_over={cfg.goodness_over!r}, "
                         f"goodness_power={cfg.goodness_power} run on the conv step (reference_conv)")
    x_pos, x_neg = x_pos.detach(), x_neg.detach()  # inputs are constants: nothing flows into x
    if cfg.gemm_dtype == "param":
        z_pos = F.linear(normalize(x_pos, cfg.norm, cfg.norm_eps), weight, bias)
        h_pos = F.relu(z_pos)
        h_neg = layer_forward(x_neg, weight, bias, cfg.norm, cfg.norm_eps)
    else:  # one GEMM over pos||neg: its bf16 dW is rounded once, not as two rounded halves summed in bf16
        x_hat = torch.cat([normalize(x_pos, cfg.norm, cfg.norm_eps), normalize(x_neg, cfg.norm, cfg.norm_eps)])
        z_pos, z_neg = linear(x_hat, weight, bias, cfg.gemm_dtype).split(x_pos.shape[0])
        h_pos, h_neg = F.relu(z_pos), F.relu(z_neg)
    g_pos, g_neg = goodness(h_pos, cfg.goodness), goodness(h_neg, cfg.goodness)
    loss, r_new = ff_loss(g_pos, g_neg, cfg), None
    if cfg.peer_norm != 0.0:
        check_peer_mean(peer_mean, weight, cfg, in_place=False)
        l_peer, r_new = peer_objective(z_pos, h_pos, peer_mean, cfg)
        loss = loss + l_peer.to(loss.dtype)
    return FFStepOutput(loss, h_pos, h_neg, g_pos, g_neg), r_new


def ff_objective(x_pos, x_neg, weight, bias, cfg: FFConfig, peer_mean=None) -> FFStepOutput:
    """Loss, activations and goodness of one FF layer, differentiable w.r.t. weight and bias only."""
    return ff_objective_peer(x_pos, x_neg, weight, bias, cfg, peer_mean)[0]


def ff_grad_peer(x_pos, x_neg, weight, bias, cfg: FFConfig, peer_mean=None):
    """(FFGradOutput, r'): the exact local gradient by autograd, and the peer running mean r' (or None)."""
    with torch.enable_grad():
        w = weight.detach().requires_grad_(True)
        b = bias.detach().requires_grad_(True) if bias is not None else None
        out, r_new = ff_objective_peer(x_pos, x_neg, w, b, cfg, peer_mean)
        grads = torch.autograd.grad(out.loss, [w] + ([b] if b is not None else []))
    return (FFGradOutput(out.loss.detach(), out.h_pos.detach(), out.h_neg.detach(), out.g_pos.detach(),
                         out.g_neg.detach(), grads[0], grads[1] if b is not None else None),
            None if r_new is None else r_new.detach())


def ff_grad(x_pos, x_neg, weight, bias, cfg: FFConfig, peer_mean=None) -> FFGradOutput:
    """The exact local gradient of the FF loss w.r.t. weight and bias, by autograd."""
    return ff_grad_peer(x_pos, x_neg, weight, bias, cfg, peer_mean)[0]


def make_optimizer(params, cfg: FFConfig) -> torch.optim.Optimizer:
    """The torch.optim optimizer docs/design.md names for this configuration."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                foreach=False)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=False)


def optimizer_update(params, grads, states, step: int, cfg: FFConfig) -> None:
    """Apply update number ``step`` (1-based) with torch.optim itself, on externally kept state.

    ``states[i]`` holds the state tensors of ``params[i]`` named by ``cfg.state_names``; torch.optim
    updates them in place, so the result is torch.optim's by construction. float16/bfloat16 parameters
    are updated as fp32 copies (their state is fp32) and rounded back, as the fused kernels do.
    """
    targets = [p.detach() for p in params]
    work = [p.float() if p.dtype in (torch.float16, torch.bfloat16) else p for p in targets]
    opt = make_optimizer(work, cfg)
    for p, g, st in zip(work, grads, states):
        p.grad = g.to(p.dtype)
        if cfg.optimizer == "adam":
            opt.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": st[0], "exp_avg_sq": st[1]}
        elif cfg.momentum != 0.0 and step > 1:
            opt.state[p] = {"momentum_buffer": st[0]}
    opt.step()
    if cfg.optimizer == "sgd" and cfg.momentum != 0.0 and step == 1:  # torch.optim made fresh buffers
        for p, st in zip(work, states):
            st[0].copy_(opt.state[p]["momentum_buffer"])
    for t, p in zip(targets, work):
        p.grad = None
        if p is not t:
            t.copy_(p)


class FFLayerRef(nn.Module):
    """The oracle FF layer: nn.Linear-shaped parameters, autograd, and a real torch.optim optimizer."""

    def __init__(self, weight: torch.Tensor, bias, cfg: FFConfig, peer_mean=None):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.optimizer = make_optimizer([p for p in (self.weight, self.bias) if p is not None], cfg)
        if cfg.peer_norm != 0.0:  # r, zeros unless given; committed after each finite step
            r = torch.zeros(weight.shape[0], dtype=state_dtype(weight.dtype), device=weight.device)
            self.register_buffer("peer_mean", r if peer_mean is None else peer_mean.detach().clone().to(r))
        else:
            self.peer_mean = None

    def forward(self, x):
        return layer_forward(x, self.weight, self.bias, self.cfg.norm, self.cfg.norm_eps)

    def step(self, x_pos, x_neg) -> FFStepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        out, r_new = ff_objective_peer(x_pos, x_neg, self.weight, self.bias, self.cfg, self.peer_mean)
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(f"ffkernels: non-finite FF loss ({out.loss.item()})")
        out.loss.backward()
        self.optimizer.step()
        if r_new is not None:
            self.peer_mean.copy_(r_new.detach())
        return FFStepOutput(*(t.detach() for t in out))

    def state_of(self, param: nn.Parameter) -> dict:
        return self.optimizer.state.get(param, {})
