"""Training a new head on cached features of the frozen base: the method's fit, a held-out check."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..bases.base import Base
from ..bases.world import MIN_BACKGROUND, Background
from ..config import GATES
from ..errors import ExtendserveError
from ..heads.calibrated import Evidence, fit_calibrated, out_of_fold, power, power_of, without_class
from ..heads.checks import MAX_LEFT_OUT, strangers_named, suspicious, trade
from ..heads.fit import fit_joint, fit_softmax
from ..heads.gated import fit_gated
from ..heads.head import Head
from ..heads.scoring import merged_logits, scorer
from ..heads.statistics import Statistics
from ..progress import eta, progress


@dataclass
class TrainSettings:
    method: str = "calibrated"  # calibrated (the default) | gated (positives-only gate) | joint | naive
    epochs: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-3  # chosen over 8 random 4-per-person splits of the shared celebrities
    seed: int = 0
    holdout: float = 0.2  # share of each class held out to report accuracy (>= 5 photos a class)
    augment: bool = True  # train on all VIEWS, not only the served centre crop
    gate: str = GATES[0]  # gated: mahalanobis (default) | cosine; see heads.gated
    gate_quantile: float = 0.05  # gated: share of (out-of-sample) positives the gate may reject
    gate_scale: float = 40.0  # gated: logits per unit of gate margin past the threshold
    gate_shrinkage: float = 0.8  # mahalanobis: weight of the isotropic part of the covariance
    gate_rank: int = 256  # mahalanobis: covariance eigenvectors kept (the rest count as isotropic)
    gate_folds: int = 5  # mahalanobis: folds for the out-of-sample positives' distances
    ranker_ridge: float = 1.0  # calibrated: the ridge ranker's L2, times the features' mean variance
    tukey: float = 0.5  # calibrated: power transform of non-negative features (1: none)
    world_shrinkage: float = 0.5  # calibrated: covariance shrinkage of the background's Gaussian
    calibration_l2: float = 1e-3  # calibrated: L2 on the four evidence weights
    max_taken: float = 0.005  # calibrated: share of background photos a new class may take (half the
    # 1% asked for: the 99th percentile of 200 photos is two photos, and unseen photos spread wider)
    taken_margin: float = 0.5  # calibrated: logits below that bound, for photos the background lacks
    finetune_lr: float = 1e-4  # --unfreeze-top: Adam step for the copied top blocks
    finetune_epochs: int = 8  # --unfreeze-top: passes over every training view
    keep_suspicious: bool = False  # train on photos flagged as out of place (checks.suspicious) too
    check_strangers: bool = True  # leave up to heads.checks.MAX_LEFT_OUT classes out in turn (False: never)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainReport:
    counts: dict[str, int]
    heldout: dict[str, Any] | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # printed by train-head as WARNING lines
    suspicious: list[dict[str, Any]] = field(default_factory=list)  # photos out of place (checks.suspicious)
    left_out: int = 0  # of them, left out of training
    checks: dict[str, Any] = field(default_factory=dict)  # what the head will do: strangers, the trade


MIN_HELD = 5  # photos a class needs before any of them is held out to measure it


def split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Stratified, seeded: hold out ``share`` of each class of at least MIN_HELD photos (a smaller
    class trains on all of its photos and is not measured), or None if no class is that large."""
    if share <= 0:
        return None
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < MIN_HELD:
            train += list(idx)
            continue
        idx = rng.permutation(idx)
        k = max(1, int(round(share * len(idx))))
        held += list(idx[:k])
        train += list(idx[k:])
    if not held:
        return None
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
        background: Background | None = None, rows: np.ndarray | None = None,
        stats: Statistics | None = None, oof: Evidence | None = None) -> Head:
    """One head by ``s.method`` on ``feats`` (or ``feats[rows]``; ``labels`` are theirs); the merged
    model scores it as the method says. ``background`` (the base's world, :mod:`world`) is what the
    calibrated head is judged against; ``stats``, ``oof``: what the run's calibrated fits share."""
    if s.method == "calibrated":  # reads feats[rows] a chunk at a time
        return fit_calibrated(base, feats, labels, classes, s, background, label, rows, stats, oof)
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


def score_features(base: Base, head: Head | list[Head], feats: np.ndarray) -> np.ndarray:
    """Merged logits [n, K + N] from features, as the merged model computes them (one head or several)."""
    x = torch.from_numpy(feats).float()
    w, b = classifier(base)
    with torch.no_grad():
        old = x @ w.T + b
        return merged_logits([scorer(h) for h in (head if isinstance(head, list) else [head])], x, old).numpy()


def taken_share(base: Base, head: Head | list[Head], feats: np.ndarray) -> float:
    """Share of photos [m, D] (none of the new classes) whose top-1 the head (or heads, together) takes."""
    if not len(feats):
        return 0.0
    return float((score_features(base, head, feats).argmax(1) >= len(base.labels)).mean())


def _listed(names: list[str], most: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"class {shown}" if len(names) == 1 else f"classes {shown}{more}"


def per_class(report: TrainReport) -> dict[str, dict[str, Any]]:
    """Each class's figures by name: photos used, held-out accuracy, strangers named (when it was
    left out), background photos taken (None where not measured)."""
    held = report.heldout or {}
    return {c: {"photos": n, "heldout_accuracy": held.get("per_class", {}).get(c),
                "strangers_named": report.checks.get("per_class", {}).get(c),
                "background_taken": held.get("background_taken_per_class", {}).get(c)}
            for c, n in report.counts.items()}


def _set_aside_suspicious(base: Base, feats: np.ndarray, labels: np.ndarray, classes: list[str], s: TrainSettings,
                          names: list[str] | None, report: TrainReport) -> tuple[np.ndarray, np.ndarray]:
    """Photos out of place (a goldfish among faces, a copy filed under two classes), found before
    training uses them and left out of it unless ``s.keep_suspicious``."""
    if names is None:
        return feats, labels
    centre = feats[:, 0]
    logits = centre @ base.weight.T + base.bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    report.suspicious = suspicious(centre, labels, classes, names, p / p.sum(1, keepdims=True), base.labels, feats)
    if not report.suspicious or s.keep_suspicious:
        return feats, labels
    out = {x["index"] for x in report.suspicious}
    keep = np.array([i not in out for i in range(len(labels))])
    if any(not (labels[keep] == c).any() for c in range(len(classes))):
        return feats, labels  # never leave a class empty: keep them, the warning says why
    report.left_out = int((~keep).sum())
    report.counts = {c: int((labels[keep] == i).sum()) for i, c in enumerate(classes)}  # what was used
    return feats[keep], labels[keep]


class _Steps:
    """train-head's fits, counted on one progress line with the time left (each fit's own steps are
    too short to show)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def next(self, what: str) -> None:
        progress("training", self.done, self.total, f"({what}){eta(self.t0, self.done, self.total)}")
        self.done += 1

    def end(self) -> None:
        progress("training", self.total, self.total, f"in {time.monotonic() - self.t0:.1f}s")


def _judged_against(background: Background | None, feats: np.ndarray, report: TrainReport) -> Background | None:
    """The background less near-copies of training photos (a class trained on background photos is
    not judged on them), or None with a warning when too few are left."""
    if background is None:
        return None
    kept = background.without(feats[:, 0])
    if len(kept) >= MIN_BACKGROUND:
        return kept
    report.warnings.append(
        f"{len(background) - len(kept)} of the {len(background)} background photos ({background.source}) are "
        f"near-copies of your training photos, leaving {len(kept)}: too few to judge the head against, so it "
        "was trained with no background (its gate comes from your photos alone and it may take photos of "
        "other kinds). Give photos of everyday things that are none of your classes with --negatives DIR")
    return None


def _heldout_check(base: Base, feats: np.ndarray, labels: np.ndarray, classes: list[str], s: TrainSettings,
                   parts: tuple[np.ndarray, np.ndarray], negatives: np.ndarray | None, background: Background | None,
                   stats: Statistics | None, report: TrainReport) -> None:
    """A head fitted on the training split (and half the background) judged on the held-out photos
    (and the other half): accuracy per class, background taken per class, the trade."""
    tr, ho = parts
    bg_fit, bg_held = background, None
    if background is not None and len(background) >= 40:
        order = np.random.default_rng(s.seed).permutation(len(background))
        half = len(order) // 2
        bg_fit = Background(background.features[order[:half]], background.source)
        bg_held = background.features[order[half:]]
    probe = fit(base, feats, labels[tr], classes, s, "training (held-out check)", negatives, bg_fit, tr, stats)
    held = score_features(base, probe, feats[ho, 0])  # each scored once, for every figure below
    world = None if bg_held is None else score_features(base, probe, bg_held)
    report.heldout = heldout_accuracy(held, labels[ho], classes)
    small = [c for i, c in enumerate(classes) if (labels == i).sum() < MIN_HELD]
    if small:
        one = len(small) == 1
        report.warnings.append(
            f"{_listed(small)} {'has' if one else 'have'} fewer than {MIN_HELD} photos: {'it trains' if one else 'they train'}"
            f" on all of them, so held-out accuracy is measured for the other classes only and says nothing about "
            f"{'it' if one else 'them'}; add photos (at least {MIN_HELD}, 20 or more to trust the figures)")
    if world is not None:
        named = world.argmax(1) - len(base.labels)
        report.heldout["background_taken"] = float((named >= 0).mean())
        report.heldout["background_photos"] = int(len(world))
        report.heldout["background_taken_per_class"] = {c: float((named == i).mean()) for i, c in enumerate(classes)}
        report.checks["trade"] = trade(held, labels[ho], world, len(base.labels))
    # the service's drift series: the share of live photos less sure than 99% of these (held-out photos
    # of the classes and of the background) were
    top = np.concatenate([1.0 / np.exp(z - z.max(1, keepdims=True)).sum(1) for z in (held, world) if z is not None])
    report.heldout["top_score_q01"] = float(np.quantile(top, 0.01))


def train_head(base: Base, feats: np.ndarray, labels: np.ndarray, classes: list[str],
               s: TrainSettings, negatives: np.ndarray | None = None,
               background: Background | None = None, names: list[str] | None = None) -> tuple[Head, TrainReport]:
    """Report held-out accuracy on a seeded split, and the share of held-out background photos
    taken (the head of that check is fitted on the other half of the background), strangers (each
    class left out in turn), then train the final head on every photo and the whole background."""
    t0 = time.time()
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        raise ExtendserveError(f"no readable photos for class(es) {missing}; add photos or remove the folder")
    report = TrainReport(counts=counts)
    background = _judged_against(background, feats, report)
    feats, labels = _set_aside_suspicious(base, feats, labels, classes, s, names, report)
    stats = None
    if s.method == "calibrated":  # one sum of every view's second moment for all the fits below
        p = power_of(feats, background, s)
        stats = Statistics(power(feats, p), p)
    parts = split(labels, s.holdout, s.seed)
    strangers = len(classes) >= 2 and s.check_strangers
    steps = _Steps((parts is not None) + (min(len(classes), MAX_LEFT_OUT) if strangers else 0) + 1)
    if parts is not None:
        steps.next("held-out check")
        _heldout_check(base, feats, labels, classes, s, parts, negatives, background, stats, report)
    # every photo's out-of-fold evidence, once: the final head's, and less a class, each strangers head's
    oof = None if stats is None else out_of_fold(stats, np.arange(len(labels)), labels, len(classes), s)
    if strangers:
        def fit_without(c: int) -> Head:
            steps.next(f"strangers check: {classes[c]} left out")
            rows = np.flatnonzero(labels != c)
            return fit(base, feats, labels[rows] - (labels[rows] > c), [k for i, k in enumerate(classes) if i != c], s,
                       f"strangers check ({classes[c]} left out)", negatives, background, rows, stats,
                       None if oof is None else without_class(oof, labels, c))

        found = strangers_named(fit_without, lambda h, f: score_features(base, h, f), feats[:, 0], labels,
                                len(classes), len(base.labels), s.seed) or {}
        if found:
            found["per_class"] = {classes[c]: share for c, share in found["per_class"].items()}
        report.checks |= found
    steps.next("the head")
    head = fit(base, feats, labels, classes, s, "training", negatives, background, stats=stats, oof=oof)
    steps.end()
    report.seconds = time.time() - t0
    return head, report
