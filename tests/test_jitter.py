"""Jitter: each image shifted by its own random offset, zeros shifted in, one vectorized gather."""
import pytest
import torch

from ffkernels.augment import check_image_shape, jitter


def _shift(img, dy, dx):
    """One (C, H, W) image shifted down by dy and right by dx, zero fill: the plain loop the gather replaces."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            si, sj = i - dy, j - dx
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = img[:, si, sj]
    return out


@pytest.mark.parametrize("shape", [(1, 6, 5), (3, 4, 7)])
def test_jitter_shifts_each_image_by_its_own_offset(shape):
    x = torch.rand(12, shape[0] * shape[1] * shape[2])
    out = jitter(x, shape, 2, torch.Generator().manual_seed(0))
    shifts = torch.randint(-2, 3, (2, 12), generator=torch.Generator().manual_seed(0))  # the same draw
    for n in range(12):
        want = _shift(x[n].reshape(shape), int(shifts[0, n]), int(shifts[1, n])).reshape(-1)
        assert torch.equal(out[n], want), n
    assert out.shape == x.shape and out.dtype == x.dtype


def test_jitter_draws_every_offset_and_zero_is_identity():
    x = torch.zeros(4000, 25)
    x[:, 12] = 1  # one lit pixel in the middle of a 5x5 image
    out = jitter(x, (1, 5, 5), 1, torch.Generator().manual_seed(0))
    where = out.argmax(1)
    assert set(where.tolist()) == {6, 7, 8, 11, 12, 13, 16, 17, 18}  # every shift in [-1, 1]^2
    assert jitter(x, (1, 5, 5), 0) is x


def test_jitter_needs_an_image_shape():
    with pytest.raises(ValueError, match="image"):
        jitter(torch.rand(3, 10), (1, 3, 3), 1)
    with pytest.raises(ValueError, match="image"):
        check_image_shape((), 10)
    with pytest.raises(ValueError, match="shift"):
        jitter(torch.rand(3, 9), (1, 3, 3), -1)
