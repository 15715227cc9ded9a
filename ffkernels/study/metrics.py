"""Cluster quality of a feature space with respect to the classes: k-NN accuracy and silhouette.

Both use cosine geometry: every feature vector is scaled to unit L2 norm (``unit_rows``) and distances are
Euclidean between those (a monotone function of the cosine). Per-dimension standardization, right for the
probe, would let near-constant dimensions (border pixels, rarely active units) dominate the distances.
k-NN accuracy says how much class information the neighbourhoods keep; the silhouette (-1..1) says how compact
and separated the class clusters are. With the linear probe they let the paper's claim (FF keeps class
boundaries but drops information) be checked with numbers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KNN_K = 10
SILHOUETTE_POINTS = 2000


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm (all-zero rows stay zero)."""
    return F.normalize(x.float(), dim=1)


def knn_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 num_classes: int, k: int = KNN_K, chunk: int = 1024) -> float:
    """Test accuracy of a majority vote among the ``k`` nearest training points (ties: the lowest class)."""
    if not 1 <= k <= len(x_train):
        raise ValueError(f"ffkernels: k-NN needs 1 <= k <= {len(x_train)} training points, got k={k}")
    y_train = y_train.to(x_train.device)
    correct = 0
    for xb, yb in zip(x_test.split(chunk), y_test.split(chunk)):
        nearest = torch.cdist(xb, x_train).topk(k, dim=1, largest=False).indices         # (b, k)
        votes = torch.zeros(len(xb), num_classes, device=xb.device)
        votes.scatter_add_(1, y_train[nearest], torch.ones_like(nearest, dtype=votes.dtype))
        correct += int((votes.argmax(1).cpu() == yb.cpu()).sum())
    return correct / max(1, len(y_test))


def silhouette(x: torch.Tensor, y: torch.Tensor, max_points: int = SILHOUETTE_POINTS, seed: int = 0) -> float:
    """Mean silhouette coefficient of the classes (scikit-learn, Euclidean) on at most ``max_points`` rows."""
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    y_np = y.cpu().numpy()
    if len(np.unique(y_np)) < 2:
        raise ValueError("ffkernels: the silhouette needs at least two classes")
    n = min(len(y_np), max_points)
    with threadpool_limits(torch.get_num_threads()):
        return float(silhouette_score(x.float().cpu().numpy(), y_np, sample_size=n if n < len(y_np) else None,
                                      random_state=seed))


def cluster_metrics(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                    num_classes: int, k: int = KNN_K) -> dict:
    """{"knn_accuracy", "silhouette"} of features (rows scaled to unit norm): k-NN from the training split to
    the test split, silhouette of the test split."""
    tr, te = unit_rows(f_train), unit_rows(f_test)
    return {"knn_accuracy": knn_accuracy(tr, y_train, te, y_test, num_classes, k),
            "silhouette": silhouette(te, y_test)}
