"""Learned PCA-whitening of region descriptors (DIR, Section 3).

DIR turns the R-MAC whitening into a shifted fully-connected layer
``P (x - m)``: `fit_pca_whitening` computes ``m`` and ``P`` by PCA of L2-normalised
region descriptors, `init_whitening` writes them into a `PCAWhitening` layer,
and ranking training fine-tunes them from there.
"""

import numpy as np


def fit_pca_whitening(descriptors, dim=None, power=0.5, epsilon=1e-9):
    """PCA (optionally whitening) of row vectors.

    Args:
        descriptors: ``[n, C]`` array (typically L2-normalised region
            descriptors of training images).
        dim: number of principal components to keep (``None`` keeps ``C``).
        power: each component is scaled by ``eigenvalue ** -power``: 0.5
            whitens, 0 is plain PCA (a rotation).
        epsilon: added to the eigenvalues before the power, so that
            near-null directions do not explode.

    Returns:
        ``(mean, projection)``: ``mean`` ``[C]`` and ``projection`` ``[C, dim]``
        (float32), so that ``(x - mean) @ projection`` is the whitened ``x``.
        Components are ordered by decreasing variance; each eigenvector's sign
        is fixed so its largest-magnitude entry is positive (deterministic).
    """
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"Need a [n, C] array with n >= 2 to fit PCA, got shape {x.shape}."
        )
    channels = x.shape[1]
    dim = channels if dim is None else int(dim)
    if not 1 <= dim <= channels:
        raise ValueError(f"`dim` must be in [1, {channels}], got {dim}.")
    mean = x.mean(axis=0)
    centered = x - mean
    cov = centered.T @ centered / x.shape[0]
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1][:dim]
    eigvals = np.maximum(eigvals[order], 0.0)
    eigvecs = eigvecs[:, order]
    signs = np.sign(eigvecs[np.abs(eigvecs).argmax(axis=0), np.arange(dim)])
    eigvecs = eigvecs * np.where(signs == 0, 1.0, signs)
    projection = eigvecs * (eigvals + epsilon) ** -power
    return mean.astype(np.float32), projection.astype(np.float32)


def init_whitening(layer, descriptors, power=0.5):
    """Fits PCA-whitening on ``descriptors`` and writes it into ``layer``.

    Args:
        layer: a built `deep_retrieval.layers.PCAWhitening`.
        descriptors: ``[n, C]`` region descriptors.
        power: see `fit_pca_whitening`.
    """
    mean, projection = fit_pca_whitening(descriptors, layer.units, power)
    layer.set_pca(mean, projection)
    return mean, projection
