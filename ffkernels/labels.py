"""Hinton-style label handling: write a label one-hot into the input, draw guaranteed-wrong labels."""
from __future__ import annotations

import torch

from .backends.contract import check_label_dtype


def _check(x: torch.Tensor, num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"ffkernels: num_classes must be an int >= 2, got {num_classes!r}")
    if x.dim() < 1 or x.shape[-1] < num_classes:
        raise ValueError(f"ffkernels: inputs need at least num_classes={num_classes} features to hold the "
                         f"label, got shape {tuple(x.shape)}")


def embed_label(x: torch.Tensor, labels: torch.Tensor, num_classes: int, value: float = 1.0) -> torch.Tensor:
    """A copy of ``x`` (…, K) whose first ``num_classes`` features are the one-hot ``labels`` times ``value``."""
    labels = _labels_like(x, labels, num_classes)
    check_label_range(labels, num_classes)
    return embed_label_unchecked(x, labels, num_classes, value)


def _labels_like(x: torch.Tensor, labels, num_classes: int) -> torch.Tensor:
    _check(x, num_classes)
    labels = torch.as_tensor(labels, device=x.device)
    if labels.shape != x.shape[:-1]:
        raise ValueError(f"ffkernels: labels must have shape {tuple(x.shape[:-1])}, got {tuple(labels.shape)}")
    check_label_dtype(labels)  # 2.7 is no class (it would embed as class 2)
    return labels


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """ValueError unless every label lies in [0, num_classes). Reads the labels on the host (a sync on a GPU)."""
    if labels.numel():
        lo, hi = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"ffkernels: labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def labels_out_of_range(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0-d bool tensor on the labels' device: whether some label lies outside [0, num_classes). No host sync."""
    labels = labels.long()
    return ((labels < 0) | (labels >= num_classes)).any()


def embed_label_unchecked(x: torch.Tensor, labels: torch.Tensor, num_classes: int, value: float = 1.0) -> torch.Tensor:
    """``embed_label`` without reading the labels on the host (no sync): a label outside [0, num_classes) gets
    all-zero label slots instead of an error, so the caller checks ``labels_out_of_range`` itself. Bit for bit
    ``embed_label`` otherwise (the one-hot built by comparison: the same 0/1 times value)."""
    labels = _labels_like(x, labels, num_classes)
    out = x.clone()
    classes = torch.arange(num_classes, device=x.device)
    out[..., :num_classes] = (labels.long().unsqueeze(-1) == classes).to(x.dtype) * value
    return out


def embed_neutral(x: torch.Tensor, num_classes: int, value: float = 1.0) -> torch.Tensor:
    """A copy of ``x`` with the label slots set to value/num_classes: no class preferred (for features)."""
    _check(x, num_classes)
    out = x.clone()
    out[..., :num_classes] = value / num_classes
    return out


def wrong_labels(labels: torch.Tensor, num_classes: int, generator: "torch.Generator | None" = None) -> torch.Tensor:
    """Labels drawn uniformly among the ``num_classes - 1`` classes that differ from ``labels``."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"ffkernels: num_classes must be an int >= 2, got {num_classes!r}")
    gen_device = generator.device if generator is not None else labels.device
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device=gen_device).to(labels.device)
    return (labels.long() + offset) % num_classes


def ff_pair(x: torch.Tensor, labels: torch.Tensor, num_classes: int, generator=None, value: float = 1.0):
    """(x_pos, x_neg): x with its true label written in, and with a guaranteed-wrong one."""
    return (embed_label(x, labels, num_classes, value),
            embed_label(x, wrong_labels(labels, num_classes, generator), num_classes, value))


def hard_negatives(scores: torch.Tensor, labels: torch.Tensor, generator: "torch.Generator | None" = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """Wrong labels drawn from the model's own scores: for row i, label c != labels[i] with probability
    softmax(scores[i] / temperature) renormalized over the wrong labels; never the true label.

    ``scores`` (B, C): e.g. a head's logits, or the summed goodness of each label (FF's loss reads g - threshold
    as a logit, so goodness is on the same scale). One vectorized draw (Gumbel-max: the arg-max of
    scores / temperature plus Gumbel noise over the wrong labels), B x C uniform numbers from ``generator``.
    NaN and -inf scores count as -inf; a row whose wrong labels are all -inf gets one of them anyway.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] < 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"ffkernels: scores must be a (B, num_classes >= 2) tensor, got {shape}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"ffkernels: temperature must be a finite number > 0, got {temperature!r}")
    labels = torch.as_tensor(labels, device=scores.device)
    if labels.shape != scores.shape[:1]:
        raise ValueError(f"ffkernels: labels must have shape ({scores.shape[0]},), got {tuple(labels.shape)}")
    gen_device = generator.device if generator is not None else scores.device
    u = torch.rand(scores.shape, generator=generator, device=gen_device, dtype=torch.float64).to(scores.device)
    gumbel = -torch.log(-torch.log(u.clamp_min_(torch.finfo(torch.float64).tiny)))
    big = torch.finfo(torch.float64).max / 4  # finite stand-ins for +-inf: keys stay finite, ties stay wrong labels
    s = torch.nan_to_num(scores.detach().double() / temperature, nan=-big, posinf=big, neginf=-big).clamp(-big, big)
    keys = s + gumbel
    keys.scatter_(1, labels.long().reshape(-1, 1), float("-inf"))
    return keys.argmax(1)
