"""How far these frozen features can tell a stranger's face from a known one, whatever the head.

Leave one of the five shared celebrities out (the stranger), train on the other four, and score
held-out photos of the four and every photo of the fifth with four "is this one of my people"
scores: the nearest training photo (cosine), the logistic ranker's top probability, the nearest
class mean (shrunk shared covariance, Mahalanobis) and that distance relative to the four people's
pooled mean. For each: AUROC (known vs stranger) and, with the threshold an oracle would pick so
that at most 35% of strangers pass, the share of known photos that pass *and* are named right.
Usage: python bench/heads/strangers_ceiling.py [--splits 10]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from logistic import fit_logistic

from extendserve.bases.base import builtin_base
from extendserve.bases.pretrained import load_backbone
from extendserve.heads.calibrated import power

from world_splits import Bench


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    ranks = np.concatenate([pos, neg]).argsort().argsort() + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def mahalanobis(train: np.ndarray, labels: np.ndarray, n: int, shrink: float = 0.8):
    means = np.stack([train[labels == c].mean(0) for c in range(n)])
    x = train - means[labels]
    cov = x.T @ x / len(x)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    inv = np.linalg.inv(cov)
    return lambda z: np.einsum("mnd,de,mne->mn", z[:, None] - means[None], inv, z[:, None] - means[None])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(2)
    f, y, classes = Bench(builtin_base(load_backbone()), "calibrated").sets["celebs"]
    n = len(classes)
    names = ("nearest photo", "ranker", "class Mahalanobis", "relative Mahalanobis")
    auc: dict[str, list[float]] = {k: [] for k in names}
    acc: dict[str, list[float]] = {k: [] for k in names}
    for seed in range(a.splits):
        rng = np.random.default_rng(1000 + seed)  # the splits of bench/heads/world_splits.py
        held = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: max(2, round(0.2 * (y == c).sum()))]
                               for c in range(n)])
        train = np.setdiff1d(np.arange(len(y)), held)
        out = seed % n
        tr, ho = train[y[train] != out], held[y[held] != out]
        remap = np.array([c - (c > out) for c in range(n)])
        t = power(f[tr], 0.5)
        views, yv = t.reshape(-1, t.shape[-1]), np.repeat(remap[y[tr]], t.shape[1])
        centre, yc = t[:, 0], remap[y[tr]]
        known, yk, strangers = power(f[ho, 0], 0.5), remap[y[ho]], power(f[y == out, 0], 0.5)
        dist, pooled = mahalanobis(views, yv, n - 1), mahalanobis(views, np.zeros_like(yv), 1)
        w, b = fit_logistic(t, yc, n - 1, 100.0)
        prob = lambda z: torch.softmax(torch.from_numpy(z @ w.T + b), 1).numpy()  # noqa: E731
        dk, ds = dist(known), dist(strangers)
        scores = {
            "nearest photo": ((known @ centre.T).max(1), (strangers @ centre.T).max(1), yc[(known @ centre.T).argmax(1)]),
            "ranker": (prob(known).max(1), prob(strangers).max(1), prob(known).argmax(1)),
            "class Mahalanobis": (-dk.min(1), -ds.min(1), dk.argmin(1)),
            "relative Mahalanobis": (pooled(known)[:, 0] - dk.min(1), pooled(strangers)[:, 0] - ds.min(1), dk.argmin(1)),
        }
        for k, (pos, neg, pred) in scores.items():
            auc[k].append(auroc(pos, neg))
            acc[k].append(float(((pos > np.quantile(neg, 0.65)) & (pred == yk)).mean()))
    print(f"| score | AUROC known vs stranger (mean over {a.splits} splits) | known photos named right, 35% of strangers named |")
    print("| --- | --- | --- |")
    for k in names:
        print(f"| {k} | {np.mean(auc[k]):.3f} | {np.mean(acc[k]):.3f} |")


if __name__ == "__main__":
    main()
