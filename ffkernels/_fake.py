"""Fake (meta) kernels of the compiled ops, so torch.compile / FakeTensor tracing and opcheck work."""
from __future__ import annotations

import torch


def _outputs(x_pos, weight):
    """loss, h_pos, h_neg, g_pos, g_neg for B = x_pos.shape[0] rows and N = weight.shape[0] features."""
    B, N = x_pos.shape[0], weight.shape[0]
    loss = x_pos.new_empty(())
    return loss, x_pos.new_empty(B, N), x_pos.new_empty(B, N), x_pos.new_empty(B), x_pos.new_empty(B)


def register() -> None:
    @torch.library.register_fake("ffkernels::ff_grad")
    def _ff_grad(x_pos, x_neg, weight, bias, norm, norm_eps, goodness, threshold, loss, symba_alpha):
        gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
        return (*_outputs(x_pos, weight), torch.empty_like(weight), gb)

    @torch.library.register_fake("ffkernels::ff_update")
    def _ff_update(weight, bias, grad_weight, grad_bias, s1w, s2w, s1b, s2b, loss, step, optimizer, lr, beta1,
                   beta2, eps, momentum, weight_decay):
        return None

    @torch.library.register_fake("ffkernels::ff_step")
    def _ff_step(x_pos, x_neg, weight, bias, s1w, s2w, s1b, s2b, step, norm, norm_eps, goodness, threshold, loss,
                 symba_alpha, optimizer, lr, beta1, beta2, eps, momentum, weight_decay):
        return _outputs(x_pos, weight)

    @torch.library.register_fake("ffkernels::ff_grad_labeled")
    def _ff_grad_labeled(x, label_pos, label_neg, num_classes, label_value, weight, bias, norm, norm_eps, goodness,
                         threshold, loss, symba_alpha):
        gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
        return (*_outputs(x, weight), torch.empty_like(weight), gb)

    @torch.library.register_fake("ffkernels::ff_step_labeled")
    def _ff_step_labeled(x, label_pos, label_neg, num_classes, label_value, weight, bias, s1w, s2w, s1b, s2b, step,
                         norm, norm_eps, goodness, threshold, loss, symba_alpha, optimizer, lr, beta1, beta2, eps,
                         momentum, weight_decay):
        return _outputs(x, weight)
