"""Pretext tasks: each transform proven on known images; labels balanced; batch = per-image application."""
import pytest
import torch

from ffkernels.study.pretext import (JIGSAW_PERMUTATIONS, PRETEXTS, balanced_labels, flip, flip_hv, get_pretext,
                                     jigsaw, make_pretext_data, rotate)


def images(n=5, c=2, h=6, w=6, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def const(n, k):
    return torch.full((n,), k, dtype=torch.long)


def test_rotation_on_a_known_image_and_undo():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    expected = {0: [[1, 2], [3, 4]], 1: [[2, 4], [1, 3]], 2: [[4, 3], [2, 1]], 3: [[3, 1], [4, 2]]}  # counter-clockwise
    for k, e in expected.items():
        assert rotate(img, const(1, k)).reshape(2, 2).tolist() == e
    x = images()
    labels = torch.tensor([0, 1, 2, 3, 1])
    back = rotate(rotate(x, labels), (4 - labels) % 4)
    assert torch.equal(back, x)
    outs = [rotate(x, const(5, k)) for k in range(4)]
    assert all(not torch.equal(outs[i], outs[j]) for i in range(4) for j in range(i))
    with pytest.raises(ValueError, match="square"):
        rotate(torch.rand(1, 1, 4, 6), const(1, 1))


def test_flips_on_a_known_image():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    assert flip(img, const(1, 0)).reshape(2, 2).tolist() == [[1, 2], [3, 4]]
    assert flip(img, const(1, 1)).reshape(2, 2).tolist() == [[2, 1], [4, 3]]           # left-right
    assert flip_hv(img, const(1, 1)).reshape(2, 2).tolist() == [[2, 1], [4, 3]]
    assert flip_hv(img, const(1, 2)).reshape(2, 2).tolist() == [[3, 4], [1, 2]]        # upside-down
    assert flip_hv(img, const(1, 3)).reshape(2, 2).tolist() == [[4, 3], [2, 1]]
    x = images()
    assert torch.equal(flip(flip(x, const(5, 1)), const(5, 1)), x)
    assert torch.equal(flip_hv(x, const(5, 3)), rotate(x, const(5, 2)))                 # both flips = 180 degrees


def test_jigsaw_permutation_is_the_one_its_label_names():
    assert len(JIGSAW_PERMUTATIONS) == 24 and len({tuple(p.tolist()) for p in JIGSAW_PERMUTATIONS}) == 24
    assert JIGSAW_PERMUTATIONS[0].tolist() == [0, 1, 2, 3]
    # an image whose 2x2 patches (row-major) hold the constants 0, 1, 2, 3, one channel offset by 10
    patch_id = torch.tensor([[0, 1], [2, 3]]).repeat_interleave(3, 0).repeat_interleave(4, 1).float()  # 6x8
    img = torch.stack([patch_id, patch_id + 10]).unsqueeze(0)                                         # (1, 2, 6, 8)
    for label in range(24):
        out = jigsaw(img, const(1, label))[0]
        for i in range(4):
            r, c = divmod(i, 2)
            patch = out[:, 3 * r:3 * r + 3, 4 * c:4 * c + 4]
            src = int(JIGSAW_PERMUTATIONS[label][i])
            assert torch.all(patch[0] == src) and torch.all(patch[1] == src + 10), (label, i)
    x = images(n=24, h=4, w=6)
    labels = torch.arange(24)
    inverse = torch.argsort(JIGSAW_PERMUTATIONS, dim=1)
    inverse_labels = torch.tensor([[p.tolist() for p in JIGSAW_PERMUTATIONS].index(q.tolist()) for q in inverse])
    assert torch.equal(jigsaw(jigsaw(x, labels), inverse_labels), x)
    with pytest.raises(ValueError, match="divisible by 2"):
        jigsaw(torch.rand(1, 1, 5, 6), const(1, 0))


@pytest.mark.parametrize("name", ["rotation", "flip", "flip-hv", "jigsaw"])
def test_batched_transform_equals_one_image_at_a_time(name):
    task = get_pretext(name)
    x = images(n=30)
    labels = torch.randint(0, task.num_labels, (30,), generator=torch.Generator().manual_seed(1))
    batched = task.transform(x, labels)
    single = torch.cat([task.transform(x[i:i + 1], labels[i:i + 1]) for i in range(30)])
    assert torch.equal(batched, single)
    assert torch.equal(task.transform(x, torch.zeros(30, dtype=torch.long)), x)  # label 0 leaves images as they are
    with pytest.raises(ValueError, match="labels must lie in"):
        task.transform(x, torch.full((30,), task.num_labels))


def test_labels_are_balanced():
    gen = torch.Generator().manual_seed(0)
    for n, k in ((100, 4), (10, 4), (48, 24), (7, 2)):
        counts = torch.bincount(balanced_labels(n, k, gen), minlength=k)
        assert int(counts.sum()) == n and int(counts.max() - counts.min()) <= 1
    a = balanced_labels(50, 4, torch.Generator().manual_seed(3))
    b = balanced_labels(50, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, torch.arange(50) % 4)  # deterministic and shuffled


def test_make_pretext_data():
    x = images(n=40, c=1, h=4, w=4).reshape(40, -1)
    y = torch.arange(40) % 10
    xs, ys = make_pretext_data(get_pretext("supervised"), x, y, (1, 4, 4), torch.Generator())
    assert xs is x and ys is y
    assert get_pretext("supervised").classes(10) == 10 and get_pretext("jigsaw").classes(10) == 24
    xr, yr = make_pretext_data(get_pretext("rotation"), x, y, (1, 4, 4), torch.Generator().manual_seed(0))
    assert xr.shape == x.shape and torch.bincount(yr).tolist() == [10, 10, 10, 10]
    assert torch.equal(xr, rotate(x.reshape(40, 1, 4, 4), yr).reshape(40, -1))
    assert set(PRETEXTS) == {"supervised", "rotation", "flip", "flip-hv", "jigsaw", "hybrid", "scff"}
    with pytest.raises(ValueError, match="hybrid task has no labels"):
        make_pretext_data(get_pretext("hybrid"), x, y, (1, 4, 4), torch.Generator())
    with pytest.raises(ValueError, match="unknown pretext task 'colour'"):
        get_pretext("colour")
