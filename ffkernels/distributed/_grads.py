"""Gradient sums across shards or micro-batches, weighted by their rows (the FF loss is a mean over rows)."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in at least fp32: fp16/bf16 sums of weighted gradients would lose precision or overflow."""
    return torch.promote_types(dtype, torch.float32)


class WeightedGradSum:
    """``sum_m w_m * [grad_weight, grad_bias, loss]`` of one layer; with w_m = rows_m / rows it is the gradient and
    loss of the concatenated rows (exactly the computed one when there is a single part, w = 1)."""

    def __init__(self):
        self.grad_weight = self.grad_bias = self.loss = None

    def add(self, out, weight: float) -> None:
        parts = [out.grad_weight, out.grad_bias, out.loss]
        dtype = acc_dtype(out.grad_weight.dtype)
        scaled = [None if t is None else t.to(dtype) * weight for t in parts]
        if self.grad_weight is None:
            self.grad_weight, self.grad_bias, self.loss = scaled
        else:
            for name, t in zip(("grad_weight", "grad_bias", "loss"), scaled):
                if t is not None:
                    getattr(self, name).add_(t)

    def result(self, param_dtype: torch.dtype):
        """(grad_weight, grad_bias, loss) with the gradients in the parameters' dtype, as ff_update takes them."""
        if self.grad_weight is None:
            raise RuntimeError("ffkernels: no gradient was accumulated")
        gb = None if self.grad_bias is None else self.grad_bias.to(param_dtype)
        return self.grad_weight.to(param_dtype), gb, self.loss
