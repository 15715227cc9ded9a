"""The optimizer's kernel arguments, computed on the host like csrc/ff_options.h (make_adam_consts /
make_sgd_consts) and torch.optim: the step-dependent constants in double precision, handed to the
kernels as fp32 scalars."""
from __future__ import annotations

from typing import NamedTuple

from .ff_math import OPTIM_CODES


class OptimArgs(NamedTuple):
    optim: int  # OPTIM_CODES of "none" (write the gradient instead), "adam" or "sgd": a kernel constexpr
    momentum_buffer: bool  # SGD keeps (and the kernel reads) a momentum buffer: a kernel constexpr
    scalars: dict  # the kernels' runtime scalar arguments, by name


def _scalars(step_size=0.0, one_minus_beta1=0.0, beta2=0.0, one_minus_beta2=0.0, eps=0.0, bc2_sqrt=1.0,
             momentum=0.0, weight_decay=0.0, first=0) -> dict:
    return {"step_size": step_size, "one_minus_beta1": one_minus_beta1, "beta2": beta2,
            "one_minus_beta2": one_minus_beta2, "eps": eps, "bc2_sqrt": bc2_sqrt, "momentum": momentum,
            "weight_decay": weight_decay, "first": first}


NO_UPDATE = OptimArgs(OPTIM_CODES["none"], False, _scalars())


def optim_args(step: int, cfg) -> OptimArgs:
    """Arguments for update number ``step`` (1-based) with the optimizer options of FFConfig ``cfg``."""
    optimizer, lr, (beta1, beta2), eps = cfg.optimizer, cfg.lr, cfg.betas, cfg.eps
    momentum, weight_decay = cfg.momentum, cfg.weight_decay
    if optimizer == "adam":
        bias_correction1 = 1 - beta1 ** step  # torch.optim.Adam's expressions, in Python floats
        bias_correction2 = 1 - beta2 ** step
        sc = _scalars(step_size=lr / bias_correction1, one_minus_beta1=1 - beta1, beta2=beta2,
                      one_minus_beta2=1 - beta2, eps=eps, bc2_sqrt=bias_correction2 ** 0.5,
                      weight_decay=weight_decay)
        return OptimArgs(OPTIM_CODES["adam"], False, sc)
    sc = _scalars(step_size=lr, momentum=momentum, weight_decay=weight_decay, first=int(step == 1))
    return OptimArgs(OPTIM_CODES["sgd"], momentum != 0.0, sc)
