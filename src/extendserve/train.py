"""Training a new head on cached features of the frozen backbone."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import LoadedBackbone
from .config import GATES
from .errors import ExtendserveError
from .features import progress
from .head import Head


@dataclass
class TrainSettings:
    method: str = "gated"  # gated (calibrated, the default) | joint (issue-2 baseline) | naive
    epochs: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-3  # chosen over 8 random 4-per-person splits of the shared celebrities
    seed: int = 0
    holdout: float = 0.2  # share of each class held out to report accuracy (>= 5 photos a class)
    augment: bool = True  # train on all VIEWS, not only the served centre crop
    gate: str = GATES[0]  # gated: mahalanobis (default) | cosine; see calibrate
    gate_quantile: float = 0.05  # gated: share of (out-of-sample) positives the gate may reject
    gate_scale: float = 40.0  # gated: logits per unit of gate margin past the threshold
    gate_shrinkage: float = 0.8  # mahalanobis: weight of the isotropic part of the covariance
    gate_rank: int = 256  # mahalanobis: covariance eigenvectors kept (the rest count as isotropic)
    gate_folds: int = 5  # mahalanobis: folds for the out-of-sample positives' distances
    finetune_lr: float = 1e-4  # --unfreeze-top: Adam step for the copied top blocks
    finetune_epochs: int = 8  # --unfreeze-top: passes over every training view

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainReport:
    counts: dict[str, int]
    heldout: dict[str, Any] | None = None
    seconds: float = 0.0


def split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Stratified, seeded: hold out ``share`` of each class, or None if any class has < 5 photos."""
    if share <= 0:
        return None
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 5:
            return None
        idx = rng.permutation(idx)
        k = max(1, int(round(share * len(idx))))
        held += list(idx[:k])
        train += list(idx[k:])
    return np.sort(np.array(train)), np.sort(np.array(held))


def flatten(feats: np.ndarray, labels: np.ndarray, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, views, D] -> one example per view (or per photo's centre crop without augmentation)."""
    v = feats if augment else feats[:, :1]
    x = torch.from_numpy(np.ascontiguousarray(v).reshape(-1, v.shape[-1])).float()
    return x, torch.from_numpy(np.repeat(labels, v.shape[1])).long()


def old_logits(backbone: LoadedBackbone, feats: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.model.forward_head(feats)


def fit_joint(
    backbone: LoadedBackbone, feats: np.ndarray, labels: np.ndarray, n_classes: int, s: TrainSettings,
    label: str = "training", negatives: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New rows trained inside the joint 1000+N softmax; the original 1000 rows stay frozen.

    ``feats`` is [n, views, D]; every view is an example (the augmentation). ``negatives``
    (photos of none of the new classes) are taught to keep the old head's own predictions.
    """
    torch.manual_seed(s.seed)
    x, y = flatten(feats, labels, s.augment)
    y = y + 1000
    old = old_logits(backbone, x)
    use_neg = negatives is not None and len(negatives) > 0
    if use_neg:
        xn, _ = flatten(negatives, np.zeros(len(negatives), np.int64), s.augment)
        old_n = old_logits(backbone, xn)
        soft_n = torch.cat([old_n.softmax(1), torch.zeros(len(xn), n_classes)], 1)

    def loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(torch.cat([old, x @ w.T + b], 1), y)
        if use_neg:
            total = total + F.cross_entropy(torch.cat([old_n, xn @ w.T + b], 1), soft_n)
        return total

    return _optimise(loss, n_classes, x.shape[1], s, label)


def fit_softmax(feats: np.ndarray, labels: np.ndarray, n_classes: int, s: TrainSettings,
                label: str = "training") -> tuple[torch.Tensor, torch.Tensor]:
    """An N-way classifier on its own (the naive recipe's head, and the gated head's ranker)."""
    torch.manual_seed(s.seed)
    x, y = flatten(feats, labels, s.augment)
    return _optimise(lambda w, b: F.cross_entropy(x @ w.T + b, y), n_classes, x.shape[1], s, label)


def _optimise(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int, d: int, s: TrainSettings,
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


def heldout_accuracy(merged_logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Top-1 among all 1000 + N outputs: a held-out photo counts only if its own class wins."""
    pred = merged_logits.argmax(1)
    right = pred == labels + 1000
    per = {c: float(right[labels == i].mean()) for i, c in enumerate(classes) if (labels == i).any()}
    return {"photos": int(len(labels)), "accuracy": float(right.mean()), "per_class": per,
            "named_imagenet": float((pred < 1000).mean())}


def fit(backbone: LoadedBackbone, feats: np.ndarray, labels: np.ndarray, classes: list[str],
        s: TrainSettings, label: str = "training", negatives: np.ndarray | None = None) -> Head:
    """One head by ``s.method``; the merged model scores it as the method says."""
    common = dict(classes=list(classes), backbone=backbone.spec.name, backbone_digest=backbone.digest,
                  settings=s.to_dict())
    if s.method == "joint":
        w, b = fit_joint(backbone, feats, labels, len(classes), s, label, negatives)
        return Head(weight=w, bias=b, method="joint", **common)
    if s.method == "naive":
        w, b = fit_softmax(feats, labels, len(classes), s, label)
        return Head(weight=w, bias=b, method="joint", **common)
    if s.method == "gated":
        from .calibrate import fit_gated

        return fit_gated(backbone, feats, labels, classes, s, label, negatives)
    raise ExtendserveError(f"unknown training method {s.method!r}; use gated, joint or naive")


def score_features(backbone: LoadedBackbone, head: Head, feats: np.ndarray) -> np.ndarray:
    """Merged logits [n, 1000 + N] from features, exactly as the merged model computes them."""
    x = torch.from_numpy(feats).float()
    with torch.no_grad():
        old = backbone.model.forward_head(x)
        return torch.cat([old, head.scorer()(x, old)], 1).numpy()


def train_head(backbone: LoadedBackbone, feats: np.ndarray, labels: np.ndarray, classes: list[str],
               s: TrainSettings, negatives: np.ndarray | None = None) -> tuple[Head, TrainReport]:
    """Report held-out accuracy on a seeded split, then train the final head on every photo."""
    t0 = time.time()
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        raise ExtendserveError(f"no readable photos for class(es) {missing}; add photos or remove the folder")
    report = TrainReport(counts=counts)
    parts = split(labels, s.holdout, s.seed)
    if parts is not None:
        tr, ho = parts
        probe = fit(backbone, feats[tr], labels[tr], classes, s, "training (held-out check)", negatives)
        report.heldout = heldout_accuracy(score_features(backbone, probe, feats[ho, 0]), labels[ho], classes)
    head = fit(backbone, feats, labels, classes, s, "training", negatives)
    report.seconds = time.time() - t0
    return head, report
