"""Fitting new rows on frozen features: full-batch Adam, deterministic on the CPU. Shared by the
methods of :mod:`train` and the gated head's ranker in :mod:`gated`, which import this
module and not each other. ``s`` is a :class:`train.TrainSettings`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import progress


def flatten(feats: np.ndarray, labels: np.ndarray, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, views, D] -> one example per view (or per photo's centre crop without augmentation)."""
    v = feats if augment else feats[:, :1]
    x = torch.from_numpy(np.ascontiguousarray(v).reshape(-1, v.shape[-1])).float()
    return x, torch.from_numpy(np.repeat(labels, v.shape[1])).long()


def old_logits(classifier: tuple[torch.Tensor, torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
    """The base's own logits from its features: its final linear classifier (weight [K, D], bias [K])."""
    w, b = classifier
    with torch.no_grad():
        return feats @ w.T + b


def fit_joint(
    classifier: tuple[torch.Tensor, torch.Tensor], feats: np.ndarray, labels: np.ndarray, n_classes: int, s: Any,
    label: str = "training", negatives: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New rows trained inside the joint K+N softmax (K: the base's own classes, whose rows stay frozen).

    ``feats`` is [n, views, D]; every view is an example (the augmentation). ``negatives``
    (photos of none of the new classes) are taught to keep the old head's own predictions.
    """
    torch.manual_seed(s.seed)
    x, y = flatten(feats, labels, s.augment)
    old = old_logits(classifier, x)
    y = y + old.shape[1]
    use_neg = negatives is not None and len(negatives) > 0
    if use_neg:
        xn, _ = flatten(negatives, np.zeros(len(negatives), np.int64), s.augment)
        old_n = old_logits(classifier, xn)
        soft_n = torch.cat([old_n.softmax(1), torch.zeros(len(xn), n_classes)], 1)

    def loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(torch.cat([old, x @ w.T + b], 1), y)
        if use_neg:
            total = total + F.cross_entropy(torch.cat([old_n, xn @ w.T + b], 1), soft_n)
        return total

    return _optimise(loss, n_classes, x.shape[1], s, label)


def fit_softmax(feats: np.ndarray, labels: np.ndarray, n_classes: int, s: Any,
                label: str = "training") -> tuple[torch.Tensor, torch.Tensor]:
    """An N-way classifier on its own (the naive recipe's head, and the gated head's ranker)."""
    torch.manual_seed(s.seed)
    x, y = flatten(feats, labels, s.augment)
    return _optimise(lambda w, b: F.cross_entropy(x @ w.T + b, y), n_classes, x.shape[1], s, label)


def _optimise(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int, d: int, s: Any,
              label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch Adam on new rows [n, d] from zeros: deterministic on the CPU."""
    w = torch.zeros(n, d, requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=s.lr, weight_decay=s.weight_decay)
    for epoch in range(s.epochs):
        opt.zero_grad()
        value = loss(w, b)
        value.backward()
        opt.step()
        progress(label, epoch + 1, s.epochs, f"loss {value.item():.3f}")
    return w.detach(), b.detach()
