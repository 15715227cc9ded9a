"""Linear probe and cluster metrics on synthetic data with known answers."""
import numpy as np
import pytest
import torch

from ffkernels.study.embedding import tsne_2d, tsne_points
from ffkernels.study.metrics import cluster_metrics, knn_accuracy, silhouette, unit_rows
from ffkernels.study.probe import Standardizer, fit_linear_probe, probe_accuracy


def blobs(n_per_class, num_classes=3, dim=20, spread=0.3, seed=0):
    """Gaussian blobs around far-apart class centres (well separated: every method must get them right)."""
    g = torch.Generator().manual_seed(seed)
    centres = 5.0 * torch.eye(num_classes, dim)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_probe_separates_separable_data_and_is_deterministic():
    x_tr, y_tr = blobs(50, seed=0)
    x_te, y_te = blobs(30, seed=1)
    assert probe_accuracy(x_tr, y_tr, x_te, y_te, 3, steps=50) == 1.0
    a = fit_linear_probe(x_tr, y_tr, 3, steps=20)
    b = fit_linear_probe(x_tr, y_tr, 3, steps=20)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.weight.shape == (3, 20) and a.accuracy(x_te, y_te) == 1.0


def test_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    x_tr, x_te = torch.randn(400, 10, generator=g), torch.randn(2000, 10, generator=g)
    y_tr, y_te = torch.randint(0, 2, (400,), generator=g), torch.randint(0, 2, (2000,), generator=g)
    assert abs(probe_accuracy(x_tr, y_tr, x_te, y_te, 2) - 0.5) < 0.05


def test_probe_minimizes_its_objective_and_weight_decay_shrinks_weights():
    x, y = blobs(40, spread=1.5)
    loose = fit_linear_probe(x, y, 3, steps=100, weight_decay=0.0)
    tight = fit_linear_probe(x, y, 3, steps=100, weight_decay=1.0)
    assert tight.weight.norm() < 0.5 * loose.weight.norm()
    zero = torch.nn.functional.cross_entropy(torch.zeros(len(y), 3), y)  # the loss at the zero start
    assert loose.final_loss < 0.1 * float(zero)


def test_probe_bad_input():
    x, y = blobs(5)
    with pytest.raises(ValueError, match="features \\(n, d\\) and n labels"):
        fit_linear_probe(x, y[:-1], 3)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 2\\)"):
        fit_linear_probe(x, y, 2)


def test_standardizer_uses_training_statistics():
    x = torch.tensor([[0.0, 10.0], [2.0, 10.0], [4.0, 10.0]])  # mean (2, 10), population std (sqrt(8/3), 0)
    std = Standardizer.fit(x)
    assert torch.allclose(std.mean, torch.tensor([2.0, 10.0])) and torch.allclose(std(x).mean(0), torch.zeros(2))
    assert torch.allclose(std(torch.tensor([[6.0, 10.0]])), torch.tensor([[4.0 / (8.0 / 3.0) ** 0.5, 0.0]]))


def test_knn_on_a_known_configuration():
    x_tr = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    y_tr = torch.tensor([0, 0, 0, 1, 1])
    x_te = torch.tensor([[0.5], [10.4], [6.5]])
    assert knn_accuracy(x_tr, y_tr, x_te, torch.tensor([0, 1, 1]), 2, k=1) == 1.0     # 6.5 is nearest to 10
    assert knn_accuracy(x_tr, y_tr, x_te, torch.tensor([0, 1, 1]), 2, k=5) == pytest.approx(1 / 3)  # majority 0
    with pytest.raises(ValueError, match="k=6"):
        knn_accuracy(x_tr, y_tr, x_te, torch.tensor([0, 1, 1]), 2, k=6)


def test_silhouette_and_cluster_metrics_on_blobs_and_noise():
    # within-class distances ~ 0.1 * sqrt(2 * 20) = 0.63, between classes ~ sqrt(50) = 7.1: silhouette ~ 0.9
    x_tr, y_tr = blobs(40, spread=0.1, seed=0)
    x_te, y_te = blobs(40, spread=0.1, seed=1)
    assert silhouette(x_te, y_te) > 0.85
    m = cluster_metrics(x_tr, y_tr, x_te, y_te, 3, k=5)
    assert m["knn_accuracy"] == 1.0 and m["silhouette"] > 0.85
    g = torch.Generator().manual_seed(2)
    noise, labels = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    assert abs(silhouette(noise, labels)) < 0.1
    assert silhouette(noise, labels, max_points=100) == silhouette(noise, labels, max_points=100)
    with pytest.raises(ValueError, match="two classes"):
        silhouette(noise, torch.zeros(300, dtype=torch.long))


def test_unit_rows_and_scale_invariance_of_the_geometry():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(unit_rows(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    x_tr, y_tr = blobs(20, seed=0)
    x_te, y_te = blobs(20, seed=1)
    scale = torch.rand(len(x_te), 1, generator=torch.Generator().manual_seed(0)) * 100 + 0.01
    plain = cluster_metrics(x_tr, y_tr, x_te, y_te, 3, k=3)
    scaled = cluster_metrics(x_tr, y_tr, scale * x_te, y_te, 3, k=3)  # a per-row scale leaves cosines unchanged
    assert scaled["knn_accuracy"] == plain["knn_accuracy"]
    assert scaled["silhouette"] == pytest.approx(plain["silhouette"], abs=1e-5)


def test_tsne_maps():
    x, _ = blobs(20, dim=60)
    coords = tsne_2d(x, seed=0)
    assert coords.shape == (60, 2) and np.isfinite(coords).all()
    idx = tsne_points(1000, 50)
    assert len(idx) == 50 and torch.equal(idx, tsne_points(1000, 50)) and len(tsne_points(10, 50)) == 10
