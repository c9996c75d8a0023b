"""What every fit of one train-head run shares, so that each fit costs one eigendecomposition.

train-head fits one head for the held-out check, one per class left out (strangers) and the final
one, and each of them again per fold for its out-of-fold evidence: 60 fits of ten classes. They
all read the same power-transformed features, so the views' second moment is summed once; a fit
of any subset of photos subtracts the photos it leaves out (a fold, a class: the smaller side)
and takes its class means from per-photo sums. From the within-class scatter's eigenvectors come
both the Mahalanobis metric (the shrunk covariance, as :func:`metric.fit_metric` computes it) and
the ranker, a ridge regression of the classes on the features solved in closed form through the
same eigenvectors (the classes' between scatter is of rank n, Woodbury's identity). The logistic
ranker it replaces took 100 L-BFGS steps per fit, 36 of train-head's 50 s on ten hand signs, and
was not converged; over random splits the ridge ranker names as many held-out photos
(docs/quality.md).
"""

from __future__ import annotations

import numpy as np

from .metric import Metric, shrunk

CHUNK = 4096  # views a step when the second moment is summed: bounds memory whatever the photo count


class Statistics:
    """The power-transformed features ``t`` [m, V, D] of a run's photos, their per-photo view sums
    and the second moment of every view, in float64."""

    def __init__(self, t: np.ndarray, power: float):
        self.t, self.power = t, power
        self.views, self.dim = t.shape[1], t.shape[2]
        self.sums = t.sum(1, dtype=np.float64)  # [m, D]
        self.second = self.moment(np.arange(len(t)))

    def moment(self, rows: np.ndarray) -> np.ndarray:
        """Sum of v v^T over every view of ``rows``, a chunk of photos at a time."""
        out = np.zeros((self.dim, self.dim))
        step = max(1, CHUNK // self.views)
        for i in range(0, len(rows), step):
            v = self.t[rows[i : i + step]].reshape(-1, self.dim).astype(np.float64)
            out += v.T @ v
        return out

    def fit(self, rows: np.ndarray, labels: np.ndarray, n: int, shrinkage: float, rank: int,
            ridge: float) -> tuple[Metric, np.ndarray, np.ndarray]:
        """The metric and the ridge ranker (weight [n, D], bias [n]) of photos ``rows`` (sorted, with
        ``labels`` in 0..n-1, every class present)."""
        left = np.setdiff1d(np.arange(len(self.t)), rows, assume_unique=True)
        second = self.second - self.moment(left) if len(left) < len(rows) else self.moment(rows)
        counts = np.bincount(labels, minlength=n) * float(self.views)
        sums = np.zeros((n, self.dim))
        np.add.at(sums, labels, self.sums[rows])
        means = sums / counts[:, None]
        m = counts.sum()
        within = (second - (means * counts[:, None]).T @ means) / m
        lam, vec = np.linalg.eigh(within)
        lam = np.clip(lam, 0.0, None)
        metric = shrunk(means, lam, vec, np.argsort(-lam)[: min(rank, len(lam))], lam.sum(), shrinkage)
        rw, rb = _ridge(lam, vec, means, counts / m, ridge)
        return metric, rw, rb


def _ridge(lam: np.ndarray, vec: np.ndarray, means: np.ndarray, share: np.ndarray,
           alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of the one-hot classes on the features, L2 of ``alpha`` times the mean variance:
    (W_within + B + l I) x = rhs, with B = U U^T and U = (mean_c - mu) sqrt(share_c), solved as
    A^-1 U (I + U^T A^-1 U)^-1 sqrt(share) with A = W_within + l I diagonal in ``vec``."""
    n = len(means)
    if n == 1:
        return np.zeros((1, vec.shape[0]), np.float32), np.zeros(1, np.float32)
    mu = share @ means
    u = (means - mu).T * np.sqrt(share)  # [D, n]
    total = lam.sum() + float((u * u).sum())  # the trace of the total covariance
    inv = 1.0 / (lam + alpha * total / len(lam))
    a_u = vec @ (inv[:, None] * (vec.T @ u))  # A^-1 U
    x = a_u @ np.linalg.solve(np.eye(n) + u.T @ a_u, np.diag(np.sqrt(share)))
    w = x.T
    return w.astype(np.float32), (share - w @ mu).astype(np.float32)
