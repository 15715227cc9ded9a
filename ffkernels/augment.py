"""Input augmentation for image datasets stored flat: random shifts (jitter)."""
from __future__ import annotations

import math

import torch


def check_image_shape(image_shape, in_features: int, what: str = "jitter") -> tuple:
    """(channels, height, width) of one flat input, or a ValueError saying why ``image_shape`` does not fit."""
    shape = tuple(int(s) for s in image_shape) if image_shape else ()
    if len(shape) != 3 or min(shape) < 1 or math.prod(shape) != in_features:
        raise ValueError(f"ffkernels: {what} needs image inputs: an image shape (channels, height, width) whose size "
                         f"is the number of features ({in_features}), got image shape {image_shape!r}")
    return shape


def jitter(x: torch.Tensor, image_shape, max_shift: int, generator: "torch.Generator | None" = None) -> torch.Tensor:
    """Each row of ``x`` (B, C*H*W), an image in (C, H, W) order, shifted by its own random (dy, dx), each
    uniform in [-max_shift, max_shift]; pixels shifted in from outside are 0.

    One gather over the zero-padded batch, on ``x``'s device; the 2B shift amounts come from ``generator``.
    ``max_shift=0`` returns ``x`` itself.
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"ffkernels: the jitter shift must be an int >= 0, got {max_shift!r}")
    if x.dim() != 2:
        raise ValueError(f"ffkernels: jitter takes a (B, features) batch, got shape {tuple(x.shape)}")
    c, h, w = check_image_shape(image_shape, x.shape[1])
    if max_shift == 0 or x.shape[0] == 0:
        return x
    k, b = max_shift, x.shape[0]
    gen_device = generator.device if generator is not None else x.device
    shift = torch.randint(-k, k + 1, (2, b), generator=generator, device=gen_device).to(x.device)
    hp, wp = h + 2 * k, w + 2 * k
    padded = torch.nn.functional.pad(x.reshape(b, c, h, w), (k, k, k, k)).reshape(b, c, hp * wp)
    # output pixel (i, j) of image n reads padded pixel (i + k - dy_n, j + k - dx_n)
    rows = torch.arange(h, device=x.device) + k - shift[0][:, None]            # (B, H)
    cols = torch.arange(w, device=x.device) + k - shift[1][:, None]            # (B, W)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w)    # (B, 1, H*W)
    return padded.gather(2, index.expand(b, c, h * w)).reshape(b, c * h * w)
