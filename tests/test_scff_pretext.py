"""The scff pretext's data (issue 21): shifted, standardized views; positives from one image, negatives from two
different batch rows with one offset k per batch; the sum construction equals SCFF's two-halves first layer; the
study settings it adds leave the fingerprints of earlier studies alone; SCFF's probe."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ffkernels.study.cli import probes_from_args
from ffkernels.study.config import StudyConfig
from ffkernels.study.pretext import (get_pretext, make_scff_data, pair_batches, scff_pairs, shift_images,
                                     standardize)
from ffkernels.study.probe import fit_adam_probes

ROOT = Path(__file__).resolve().parents[1]


def _images(n, h=6, w=5):
    return torch.randn(n, 1, h, w, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("dy,dx", [(0, 0), (1, 0), (0, -2), (-1, 2), (2, 2)])
def test_shift_moves_the_content_and_fills_zeros(dy, dx):
    img = _images(1)
    g = torch.Generator().manual_seed(0)
    # find a seed whose single draw is (dy, dx): the draw order is the function's own
    for seed in range(2000):
        g.manual_seed(seed)
        if torch.randint(-2, 3, (1, 2), generator=g).tolist()[0] == [dy, dx]:
            break
    else:
        pytest.fail("no seed draws this shift")
    out = shift_images(img, 2, g.manual_seed(seed))
    expect = torch.zeros_like(img)
    h, w = img.shape[-2:]
    for r in range(h):
        for c in range(w):
            if 0 <= r - dy < h and 0 <= c - dx < w:
                expect[..., r, c] = img[..., r - dy, c - dx]
    assert torch.equal(out, expect)


def test_shift_zero_is_the_identity_and_bad_shift_raises():
    x = _images(4)
    assert torch.equal(shift_images(x, 0, torch.Generator()), x)
    with pytest.raises(ValueError, match="max_shift"):
        shift_images(x, -1, torch.Generator())


def test_standardize_rows():
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64) * 3 + 2
    s = standardize(x).reshape(7, -1)
    assert torch.allclose(s.mean(1), torch.zeros(7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.std(1), torch.ones(7, dtype=torch.float64), atol=1e-5)


def test_pairs_positive_same_image_negative_offset_k():
    b, shape = 9, (1, 6, 5)
    x = _images(b).reshape(b, -1)
    g = torch.Generator().manual_seed(3)
    replay = torch.Generator().manual_seed(3)
    pos, neg, k = scff_pairs(x, shape, 2, g)
    # the same draws by hand: view 1 of every image, view 2 of every image, then k
    v1 = standardize(shift_images(x.reshape(b, *shape), 2, replay)).reshape(b, -1)
    v2 = standardize(shift_images(x.reshape(b, *shape), 2, replay)).reshape(b, -1)
    assert k == int(torch.randint(1, b, (1,), generator=replay)) and 1 <= k <= b - 1
    assert torch.equal(pos, v1 + v2)
    for i in range(b):
        assert torch.equal(neg[i], v1[i] + v2[(i + k) % b])


def test_pairs_without_shift_positive_is_twice_the_standardized_image():
    b, shape = 5, (1, 6, 5)
    x = _images(b).reshape(b, -1)
    pos, neg, k = scff_pairs(x, shape, 0, torch.Generator().manual_seed(1))
    s = standardize(x)
    assert torch.equal(pos, s + s)
    assert torch.equal(neg, s + s.roll(-k, 0))
    assert not any(torch.equal(neg[i], pos[i]) for i in range(b))  # distinct images: no negative is a positive


def test_one_k_per_batch_and_every_offset_drawn():
    b, shape = 4, (1, 6, 5)
    x = _images(b).reshape(b, -1)
    g = torch.Generator().manual_seed(0)
    seen = {scff_pairs(x, shape, 0, g)[2] for _ in range(60)}
    assert seen == {1, 2, 3}


def test_sum_construction_equals_the_two_halves_layer():
    """SCFF's first layer: the same weights on both halves of the concatenated pair, added, plus 2 * bias. An
    ordinary layer on the sum with bias 2 * bias is the same map."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 30, dtype=torch.float64), torch.randn(6, 30, dtype=torch.float64)
    w, bias = torch.randn(8, 30, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    pair = torch.cat([a, b], 1)
    halves = F.linear(pair[:, :30], w) + F.linear(pair[:, 30:], w) + 2 * bias
    assert torch.allclose(F.linear(a + b, w, 2 * bias), halves, rtol=0, atol=1e-12)


def test_pair_batches_never_leave_one_image_alone():
    assert [len(t) for t in pair_batches(11, 5)] == [5, 6]
    assert [len(t) for t in pair_batches(10, 5)] == [5, 5]
    assert torch.equal(torch.cat(pair_batches(11, 5)), torch.arange(11))
    with pytest.raises(ValueError, match="at least 2"):
        pair_batches(1, 5)
    with pytest.raises(ValueError, match="at least 2"):
        scff_pairs(torch.zeros(1, 30), (1, 6, 5), 0, torch.Generator())


def test_fixed_test_pairs_cover_every_image_once():
    x = _images(11).reshape(11, -1)
    pos, neg = make_scff_data(x, (1, 6, 5), 5, 0, torch.Generator().manual_seed(0))
    assert pos.shape == neg.shape == x.shape
    assert torch.equal(pos, 2 * standardize(x))


def test_the_task_is_ff_only():
    from ffkernels.study.algos import runs_on

    task = get_pretext("scff")
    assert task.kind == "pairs" and runs_on("ff", task) and not runs_on("bp", task)


def test_scff_settings_keep_earlier_fingerprints():
    """A study folder written before scff existed must still resume: its stored fingerprint is recomputed."""
    stored = json.loads((ROOT / "docs" / "study-paper" / "results.json").read_text())
    assert StudyConfig.from_dict(stored["config"]).fingerprint() == stored["fingerprint"]
    changed = StudyConfig.from_dict({**stored["config"], "scff_lambda": 0.5})
    assert changed.fingerprint() != stored["fingerprint"]
    assert StudyConfig.from_dict(changed.to_dict()) == changed
    assert "scff_lambda: 0.001 -> 0.5" in StudyConfig.from_dict(stored["config"]).differences(changed)


@pytest.mark.parametrize("bad", [dict(scff_lambda=-1.0), dict(scff_shift=-1), dict(scff_thresholds=()),
                                 dict(scff_thresholds=((1.0, float("nan")),)), dict(scff_thresholds=(1.0,))])
def test_bad_scff_settings_raise(bad):
    with pytest.raises(ValueError, match="scff"):
        StudyConfig(**bad)


def test_probe_names():
    assert probes_from_args("both") == ("lbfgs", "paper")
    assert probes_from_args(["lbfgs", "scff", "both"]) == ("lbfgs", "scff", "paper")


def test_adam_probe_dropout_and_halving_change_the_result_deterministically():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)
    plain = fit_adam_probes([x], y, 3, epochs=3, lr=1e-2, batch_size=16, seed=0)[0]
    drop = [fit_adam_probes([x], y, 3, epochs=3, lr=1e-2, batch_size=16, seed=0, dropout=0.5)[0] for _ in range(2)]
    halved = fit_adam_probes([x], y, 3, epochs=3, lr=1e-2, batch_size=16, seed=0, halve_at=(1,))[0]
    assert torch.equal(drop[0].weight, drop[1].weight)
    assert not torch.equal(plain.weight, drop[0].weight)
    assert not torch.equal(plain.weight, halved.weight)
    with pytest.raises(ValueError, match="dropout"):
        fit_adam_probes([x], y, 3, epochs=1, lr=1e-2, batch_size=16, seed=0, dropout=1.0)
