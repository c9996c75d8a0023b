"""Training a new head on cached features of the frozen base: the method's fit, a held-out check."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .base import Base
from .calibrate import fit_gated
from .calibrated import fit_calibrated
from .config import GATES
from .errors import ExtendserveError
from .fit import fit_joint, fit_softmax
from .head import Head
from .scoring import merged_logits, scorer
from .world import MIN_BACKGROUND, Background


@dataclass
class TrainSettings:
    method: str = "calibrated"  # calibrated (the default) | gated (positives-only gate) | joint | naive
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
    ranker_c: float = 100.0  # calibrated: inverse L2 strength of the ranker on unit features
    tukey: float = 0.5  # calibrated: power transform of non-negative features (1: none)
    world_shrinkage: float = 0.5  # calibrated: covariance shrinkage of the background's Gaussian
    calibration_l2: float = 1e-3  # calibrated: L2 on the four evidence weights
    max_taken: float = 0.005  # calibrated: share of background photos a new class may take (half the
    # 1% asked for: the 99th percentile of 200 photos is two photos, and unseen photos spread wider)
    taken_margin: float = 0.5  # calibrated: logits below that bound, for photos the background lacks
    finetune_lr: float = 1e-4  # --unfreeze-top: Adam step for the copied top blocks
    finetune_epochs: int = 8  # --unfreeze-top: passes over every training view

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainReport:
    counts: dict[str, int]
    heldout: dict[str, Any] | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # printed by train-head as WARNING lines


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


def heldout_accuracy(merged_logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Top-1 among all K + N outputs: a held-out photo counts only if its own class wins."""
    k = merged_logits.shape[1] - len(classes)  # the base's own classes
    pred = merged_logits.argmax(1)
    right = pred == labels + k
    per = {c: float(right[labels == i].mean()) for i, c in enumerate(classes) if (labels == i).any()}
    return {"photos": int(len(labels)), "accuracy": float(right.mean()), "per_class": per,
            "named_imagenet": float((pred < k).mean())}


def classifier(base: Base) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(base.weight), torch.from_numpy(base.bias)


def fit(base: Base, feats: np.ndarray, labels: np.ndarray, classes: list[str],
        s: TrainSettings, label: str = "training", negatives: np.ndarray | None = None,
        background: Background | None = None, rows: np.ndarray | None = None) -> Head:
    """One head by ``s.method`` on ``feats`` (or ``feats[rows]``; ``labels`` are theirs); the merged
    model scores it as the method says. ``background`` (the base's world, :mod:`world`) is what the
    calibrated head is judged against."""
    if s.method == "calibrated":  # reads feats[rows] a chunk at a time
        return fit_calibrated(base, feats, labels, classes, s, background, label, rows)
    if rows is not None:
        feats = feats[rows]
    common = dict(classes=list(classes), backbone=base.name, backbone_digest=base.digest,
                  settings=s.to_dict())
    if s.method == "joint":
        w, b = fit_joint(classifier(base), feats, labels, len(classes), s, label, negatives)
        return Head(weight=w, bias=b, method="joint", **common)
    if s.method == "naive":
        w, b = fit_softmax(feats, labels, len(classes), s, label)
        return Head(weight=w, bias=b, method="joint", **common)
    if s.method == "gated":
        return fit_gated(base, feats, labels, classes, s, label, negatives)
    raise ExtendserveError(f"unknown training method {s.method!r}; use calibrated, gated, joint or naive")


def score_features(base: Base, head: Head, feats: np.ndarray) -> np.ndarray:
    """Merged logits [n, K + N] from features, as the merged model computes them."""
    x = torch.from_numpy(feats).float()
    w, b = classifier(base)
    with torch.no_grad():
        old = x @ w.T + b
        return merged_logits([scorer(head)], x, old).numpy()


def taken_share(base: Base, head: Head, feats: np.ndarray) -> float:
    """Share of photos [m, D] (none of the new classes) whose top-1 the head takes."""
    if not len(feats):
        return 0.0
    return float((score_features(base, head, feats).argmax(1) >= len(base.labels)).mean())


def train_head(base: Base, feats: np.ndarray, labels: np.ndarray, classes: list[str],
               s: TrainSettings, negatives: np.ndarray | None = None,
               background: Background | None = None) -> tuple[Head, TrainReport]:
    """Report held-out accuracy on a seeded split, and the share of held-out background photos
    taken (the head of that check is fitted on the other half of the background), then train the
    final head on every photo and the whole background."""
    t0 = time.time()
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        raise ExtendserveError(f"no readable photos for class(es) {missing}; add photos or remove the folder")
    report = TrainReport(counts=counts)
    if background is not None:  # a class trained on background photos is not judged on those photos
        kept = background.without(feats[:, 0])
        if len(kept) < MIN_BACKGROUND:
            report.warnings.append(
                f"{len(background) - len(kept)} of the {len(background)} background photos ({background.source}) are "
                f"near-copies of your training photos, leaving {len(kept)}: too few to judge the head against, so it "
                "was trained with no background (its gate comes from your photos alone and it may take photos of "
                "other kinds). Give photos of everyday things that are none of your classes with --negatives DIR")
            background = None
        else:
            background = kept
    parts = split(labels, s.holdout, s.seed)
    if parts is not None:
        tr, ho = parts
        bg_fit, bg_held = background, None
        if background is not None and len(background) >= 40:
            order = np.random.default_rng(s.seed).permutation(len(background))
            half = len(order) // 2
            bg_fit = Background(background.features[order[:half]], background.source)
            bg_held = background.features[order[half:]]
        probe = fit(base, feats, labels[tr], classes, s, "training (held-out check)", negatives, bg_fit, rows=tr)
        report.heldout = heldout_accuracy(score_features(base, probe, feats[ho, 0]), labels[ho], classes)
        if bg_held is not None:
            report.heldout["background_taken"] = taken_share(base, probe, bg_held)
            report.heldout["background_photos"] = int(len(bg_held))
    head = fit(base, feats, labels, classes, s, "training", negatives, background)
    report.seconds = time.time() - t0
    return head, report
