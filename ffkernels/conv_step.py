"""The one way a layer runs a backend's conv FF step (FFConv2d; FFLinear's competitive and goodness_power=1 steps as
1x1 convolutions): option and input checks, autocast's GEMM dtype, the optimizer state, then the backend's fused
``conv_step`` / ``conv_grad`` (docs/design.md, "Convolutional FF")."""
from __future__ import annotations

import torch

from ._types import BackendUnavailableError
from .backends import get_backend
from .backends.contract_conv import check_conv_inputs
from .labels import check_label_range, labels_out_of_range
from .layer_base import nan_first_row_if


def conv_backend_call(layer, x_pos, x_neg, target, geom, shape=None, update: bool = True):
    """(out, labels_bad): ``layer``'s conv step (``update``) or gradient on 4-D inputs, and for the competitive loss a
    0-d bool tensor saying whether a target label lies outside [0, num_classes) (else None).

    ``shape``: the 4-D shape the layer's weight and its optimizer state are viewed as (FFLinear: (N, K, 1, 1)); the
    gradient comes back in the weight's own shape. The labels are not read on the host: out-of-range ones are clamped
    for the kernels and the first image made NaN (so the loss is NaN and no update happens); the caller reads
    labels_bad with the loss, in one sync (``check_step``). ``out``: the backend's FFStepOutput / FFGradOutput (h_neg,
    g_neg None for the competitive loss)."""
    backend = get_backend(layer.backend)
    fn = getattr(backend, "conv_step" if update else "conv_grad", None)
    if fn is None:
        raise BackendUnavailableError(f"ffkernels: backend {backend.name!r} has no conv FF kernels yet; use "
                                      "backend='cpu' (CPU tensors), 'cuda' or 'triton' (CUDA tensors) or 'reference'")
    cfg = layer._step_config(backend)
    w, b = layer._param_views()
    w4 = w if shape is None else w.view(shape)
    num_classes = layer.num_classes or 0
    x_pos, target, bad = checked_inputs(x_pos, x_neg, target, w4, b, geom, cfg, num_classes)
    with torch.no_grad():
        if update:
            st_w = tuple(t.view(w4.shape) for t in layer._states("weight"))
            st_b = layer._states("bias") if b is not None else ()
            return fn(x_pos, x_neg, target, w4, b, st_w, st_b, layer.step_count + 1, geom, num_classes, cfg), bad
        out = fn(x_pos, x_neg, target, w4, b, geom, num_classes, cfg)
    return out._replace(grad_weight=out.grad_weight.reshape(w.shape)), bad


def checked_inputs(x_pos, x_neg, target, weight, bias, geom, cfg, num_classes: int) -> tuple:
    """(x_pos, target, labels_bad) after ``check_conv_inputs``, the labels unread on the host: for the competitive
    loss, out-of-range labels clamped and, where one was, the first image made NaN (a copy of x_pos), labels_bad the
    0-d flag ``check_step`` reads with the loss; without target, (x_pos, None, None)."""
    if target is not None:
        target = torch.as_tensor(target, device=weight.device)
    check_conv_inputs(x_pos, x_neg, target, weight, bias, geom, cfg, num_classes, check_range=False)
    if target is None:
        return x_pos, None, None
    bad = labels_out_of_range(target, num_classes)
    return nan_first_row_if(bad, x_pos.clone()), target.clamp(0, num_classes - 1), bad


def check_step(layer, out, labels_bad, target) -> None:
    """The one host read of a layer's step: the loss's finiteness and, for the competitive loss, the labels' range
    (ValueError naming them; nothing was updated), then NonFiniteLossError for a non-finite loss."""
    if labels_bad is None:
        layer._check_finite(out.loss)
        return
    bad_labels, bad_loss = torch.stack([labels_bad, ~torch.isfinite(out.loss)]).tolist()
    if bad_labels:
        check_label_range(torch.as_tensor(target), layer.num_classes)
    if bad_loss:
        layer._check_finite(out.loss)
