"""A shrunk-covariance Mahalanobis metric on unit features: the distance both new-class heads
measure a photo by (the gated head's gate, the calibrated head's class and world evidence), fitted
a chunk of photos at a time so its memory does not grow with the photos."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    """Each row at unit length (an all-zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Metric:
    """A shrunk-covariance Mahalanobis metric on unit features, stored low-rank: with C the
    pooled within-class covariance, S = (1 - a) C + sigma I and sigma = a * trace(C) / D,
    d(z) = (|z|^2 - sum_i w_i (v_i . z)^2) / sigma over C's top ``rank`` eigenvectors v_i
    (w_i = (1 - a) l_i / ((1 - a) l_i + sigma)). The same truncated form is used to choose the
    threshold and inside the graph, so the two agree exactly."""

    means: np.ndarray  # [n, D]
    basis: np.ndarray  # [D, r]
    weights: np.ndarray  # [r]
    sigma: float

    def distances(self, feats: np.ndarray) -> np.ndarray:
        """[m, D] features -> [m, n] distances to each class mean, in float64.

        |z|^2 - sum_i w_i p_i^2 (z = unit - mean, p = V^T z) expanded into matrix products, so no
        [m, n, D] array is made (at 1000 classes and photos that array was 10 GB). The difference
        of two sums cancels: in float32 it moved the gate by 3e-3 logits between CPU kinds, in
        float64 by ~1e-12; the graph computes it in float64 too (scoring.Distances)."""
        u = unit(feats).astype(np.float64)
        m, v, w = (np.asarray(x, np.float64) for x in (self.means, self.basis, self.weights))
        mv, uv = m @ v, u @ v
        sq = (u * u).sum(1)[:, None] - 2.0 * (u @ m.T) + (m * m).sum(1)[None]
        proj = (uv * uv * w).sum(1)[:, None] - 2.0 * ((uv * w) @ mv.T) + (mv * mv * w).sum(1)[None]
        return np.maximum(sq - proj, 0.0) / self.sigma


CHUNK = 4096  # views a step, when statistics are accumulated: bounds memory whatever the photo count


def rows_of(feats: np.ndarray, rows: np.ndarray | None) -> Callable[[int, int], np.ndarray]:
    """``take(i, j)``: photos i..j of ``feats[rows]`` without making ``feats[rows]`` (a fold's
    photos are most of them: a copy of all their views would double train-head's features)."""
    if rows is None:
        return lambda i, j: feats[i:j]
    return lambda i, j: feats[rows[i:j]]


def fit_metric(feats: np.ndarray, labels: np.ndarray, n: int, shrinkage: float, rank: int,
               rows: np.ndarray | None = None) -> Metric:
    """Class means and shared shrunk covariance of all views' unit features [m, V, D] (of
    ``feats[rows]`` when given; ``labels`` are theirs), accumulated a chunk of photos at a time in
    float64 (no float64 copy of every view)."""
    photos, views, d = (len(rows) if rows is not None else len(feats)), feats.shape[1], feats.shape[2]
    take = rows_of(feats, rows)
    step = max(1, CHUNK // views)
    sums, counts = np.zeros((n, d)), np.zeros(n)
    for i in range(0, photos, step):
        np.add.at(sums, labels[i : i + step], unit(take(i, i + step)).astype(np.float64).sum(1))
        counts += np.bincount(labels[i : i + step], minlength=n) * views
    means = sums / counts[:, None]

    def centred(i: int) -> np.ndarray:
        u = unit(take(i, i + step)).astype(np.float64)
        return (u - means[labels[i : i + step], None, :]).reshape(-1, d)

    m = photos * views
    if m < d:  # fewer views than dimensions: the same eigenvectors from the m x m Gram matrix, faster
        c = centred(0) if step >= photos else np.concatenate([centred(i) for i in range(0, photos, step)])
        lam, u = np.linalg.eigh(c @ c.T / m)
        lam = np.clip(lam, 0.0, None)
        top = np.argsort(-lam)[: min(rank, m)]
        top = top[lam[top] > 1e-12 * max(lam.max(), 1e-30)]
        vec = np.zeros((d, len(lam)))
        vec[:, top] = c.T @ u[:, top] / np.sqrt(m * lam[top])
        total = lam.sum()
    else:
        scatter = np.zeros((d, d))
        for i in range(0, photos, step):
            c = centred(i)
            scatter += c.T @ c
        lam, vec = np.linalg.eigh(scatter / m)
        lam = np.clip(lam, 0.0, None)
        top = np.argsort(-lam)[: min(rank, len(lam))]
        total = lam.sum()
    return shrunk(means, lam, vec, top, total, shrinkage)


def shrunk(means: np.ndarray, lam: np.ndarray, vec: np.ndarray, top: np.ndarray, total: float,
           shrinkage: float) -> Metric:
    """The Metric of class ``means`` under the covariance with eigenpairs ``lam``, ``vec`` (kept:
    ``top``; ``total``: the whole trace) shrunk by ``shrinkage`` towards a sphere."""
    sigma = max(shrinkage * total / vec.shape[0], 1e-12)
    w = (1 - shrinkage) * lam[top] / ((1 - shrinkage) * lam[top] + sigma)
    return Metric(means.astype(np.float32), vec[:, top].astype(np.float32), w.astype(np.float32), float(sigma))
