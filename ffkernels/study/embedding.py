"""2-D t-SNE maps of feature spaces (scikit-learn), for the plots."""
from __future__ import annotations

import numpy as np
import torch

from .metrics import unit_rows

TSNE_PCA_DIMS = 50


def tsne_points(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    """The indices of the ``n`` test points every t-SNE map of a dataset shows (the same for all runs)."""
    return torch.from_numpy(np.sort(np.random.RandomState(seed).permutation(n_total)[:min(n, n_total)]))


def tsne_2d(features: torch.Tensor, seed: int = 0) -> np.ndarray:
    """(n, 2) t-SNE coordinates of ``features`` in cosine geometry (rows scaled to unit norm, as for the
    metrics), reduced to 50 dims by PCA first when wider. Uses torch.get_num_threads() threads."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = unit_rows(features).cpu().numpy()
    with threadpool_limits(torch.get_num_threads()):
        if x.shape[1] > TSNE_PCA_DIMS and len(x) > TSNE_PCA_DIMS:
            x = PCA(TSNE_PCA_DIMS, random_state=seed).fit_transform(x)
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x).astype(np.float32)
