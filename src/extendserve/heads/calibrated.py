"""The calibrated head: one probability model for the base's classes and the new ones.

The base is left as it is; each new class k gets the logit ``LSE(base logits) + h_k(x)``, so that
the softmax over all outputs is

    p(new class k) = e^h_k / (1 + sum_j e^h_j),   p(base class j) = p_base(j) / (1 + sum_j e^h_j)

and where no new class applies (every h_k very negative) the base's classes keep exactly the
base's own scores, in the same order. ``h_k`` is the log-odds "class k rather than anything else
the base knows", a conditional logit on four pieces of evidence, each with one learnt weight:

- ``-d_k``: Mahalanobis distance to class k's mean (Tukey-transformed, unit-normalised features,
  shrunk covariance shared by the classes: photos' own variation counts less);
- ``r_k - max r``: a ridge ranker among the new classes (which of them; :mod:`statistics`);
- ``d_bg``: distance to the base's world, a Gaussian of the background's features (relative
  Mahalanobis: far from the world and near class k is evidence for k);
- ``conf``: the base's own top log-probability (a photo the base is sure is a goldfish is not
  "my dishes").

The weights are fitted by maximum likelihood on out-of-fold training photos (label k) against
the background photos (label "none"; their world distance out of fold too), weighted half and
half, so the scores are calibrated probabilities. Then the offset is lowered, if needed, until at
most ``max_taken`` of the background photos would be named as a new class, with ``taken_margin``
logits to spare for photos the background did not show. Why this and not the positives-only gate
of :mod:`calibrate`: README, "New classes that know the world" (``bench/heads/world_splits.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..bases.base import Base
from ..bases.world import MIN_BACKGROUND, Background
from .head import Head
from .metric import Metric, fit_metric, rows_of
from .statistics import Statistics

EVIDENCE = ("class_distance", "ranker", "world_distance", "base_confidence")
POWER_CHUNK = 256  # photos a step in the power transform


def power(feats: np.ndarray, p: float, rows: np.ndarray | None = None) -> np.ndarray:
    """Tukey's power transform then unit length (p = 1: unit length only) of ``feats`` (or of
    ``feats[rows]``), a chunk of photos at a time into one new array: the whole-array form held
    three more copies of every feature at once."""
    take, m = rows_of(feats, rows), len(feats) if rows is None else len(rows)
    out = np.empty((m, *feats.shape[1:]), np.result_type(feats.dtype, np.float32))
    for i in range(0, m, POWER_CHUNK):
        x = take(i, i + POWER_CHUNK)
        x = np.power(np.maximum(x, 0.0), p) if p != 1 else x
        out[i : i + POWER_CHUNK] = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def _folds(labels: np.ndarray, n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in range(n):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _evidence(d: np.ndarray, r: np.ndarray, dbg: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """[m, N, 4] in the order of EVIDENCE."""
    return np.stack([-d, r - r.max(1, keepdims=True), np.broadcast_to(dbg[:, None], d.shape),
                     np.broadcast_to(conf[:, None], d.shape)], -1)


def _conditional_logit(x: np.ndarray, avail: np.ndarray, y: np.ndarray, w: np.ndarray,
                       l2: float) -> tuple[np.ndarray, float]:
    """Shared weights a, offset b: P(k) = e^(a.x_k + b) / (1 + sum e^(...)), label 0 = none."""
    xt = torch.from_numpy(x.astype(np.float64))
    mask = torch.from_numpy(avail)
    yt = torch.from_numpy(y).long()
    wt = torch.from_numpy(w.astype(np.float64))
    a = torch.zeros(x.shape[-1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        h = (xt @ a + b).masked_fill(~mask, -1e9)
        logits = torch.cat([torch.zeros(len(h), 1, dtype=h.dtype), h], 1)
        loss = (wt * torch.nn.functional.cross_entropy(logits, yt, reduction="none")).sum() + l2 * (a * a).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return a.detach().numpy(), float(b.detach())


class Fitted:
    """The fitted numbers, and the same formula the graph computes, in numpy."""

    def __init__(self, p: float, metric: Metric, world: Metric | None, rw: np.ndarray, rb: np.ndarray,
                 coef: np.ndarray, offset: float, base_w: np.ndarray, base_b: np.ndarray):
        self.p, self.metric, self.world, self.rw, self.rb = p, metric, world, rw, rb
        self.coef, self.offset, self.base_w, self.base_b = coef, offset, base_w, base_b

    def evidence(self, feats: np.ndarray, world_d: np.ndarray | None = None) -> np.ndarray:
        t = power(feats, self.p)
        if world_d is None:
            world_d = self.world.distances(t)[:, 0] if self.world is not None else np.zeros(len(t))
        conf = _log_softmax(feats @ self.base_w.T + self.base_b).max(1)
        return _evidence(self.metric.distances(t), t @ self.rw.T + self.rb, world_d, conf)

    def h(self, ev: np.ndarray) -> np.ndarray:
        return ev @ self.coef + self.offset

    def margin(self, feats: np.ndarray, world_d: np.ndarray | None = None) -> np.ndarray:
        """> 0 where a new class wins the merged model's top-1."""
        return self.h(self.evidence(feats, world_d)).max(1) - _log_softmax(feats @ self.base_w.T + self.base_b).max(1)


def out_of_fold(stats: Statistics, rows: np.ndarray, labels: np.ndarray, n: int,
                 s: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class distances and ranker scores [m, n] of each training photo's served view (photos
    ``stats.t[rows]``) by the metric and ranker fitted without its fold, and which classes that fold's
    fit knew (a class whose photos are all held out is unknown there, unless it is the photo's own:
    then its other views stand in)."""
    t = stats.t
    fold = _folds(labels, n, s.gate_folds, s.seed)
    d_oof, r_oof = np.zeros((len(labels), n)), np.zeros((len(labels), n))
    avail = np.ones((len(labels), n), bool)
    for j in range(s.gate_folds):
        held, rest = fold == j, fold != j
        if not held.any():
            continue
        if not rest.any():  # one photo per class: measured in sample
            rest = held
        kept = np.unique(labels[rest])
        m, w, b = stats.fit(rows[rest], np.searchsorted(kept, labels[rest]), len(kept), s.gate_shrinkage,
                            s.gate_rank, s.ranker_ridge)
        centre = t[rows[held], 0]
        d_oof[np.ix_(held, kept)] = m.distances(centre)
        r_oof[np.ix_(held, kept)] = centre @ w.T + b
        for i in np.flatnonzero(held):
            for c in np.setdiff1d(np.arange(n), kept):
                if c == labels[i]:  # its class has no other photo: the mean of its own other views
                    own = Metric(t[rows[i], 1:].mean(0, keepdims=True), m.basis, m.weights, m.sigma)
                    d_oof[i, c] = own.distances(t[rows[i], :1])[0, 0]
                    r_oof[i, c] = r_oof[i, kept].max() if len(kept) else 0.0
                else:
                    avail[i, c] = False
    return d_oof, r_oof, avail


def _against_world(fitted: Fitted, base: Base, centre: np.ndarray, t_centre: np.ndarray, labels: np.ndarray, n: int,
                   oof: tuple[np.ndarray, np.ndarray, np.ndarray], bg: Background, s: Any) -> dict[str, Any]:
    """Fit the world's Gaussian, then the evidence weights and offset of ``fitted`` against the
    background; the figures for the head's settings."""
    d_oof, r_oof, avail = oof
    tb = power(bg.features, fitted.p)
    world = fit_metric(tb[:, None, :], np.zeros(len(tb), np.int64), 1, s.world_shrinkage, s.gate_rank)
    bf = np.arange(len(tb)) % 5
    world_oof = np.empty(len(tb))
    for j in range(5):
        mj = fit_metric(tb[bf != j, None, :], np.zeros(int((bf != j).sum()), np.int64), 1, s.world_shrinkage, s.gate_rank)
        world_oof[bf == j] = mj.distances(tb[bf == j])[:, 0]
    fitted.world = world
    conf_p = _log_softmax(centre @ base.weight.T + base.bias).max(1)
    xp = _evidence(d_oof, r_oof, world.distances(t_centre)[:, 0], conf_p)
    xb = fitted.evidence(bg.features, world_oof)
    x = np.concatenate([xp, xb])
    mu = x.reshape(-1, 4).mean(0)
    sd = x.reshape(-1, 4).std(0) + 1e-9
    a, b0 = _conditional_logit((x - mu) / sd, np.concatenate([avail, np.ones((len(tb), n), bool)]),
                               np.concatenate([labels + 1, np.zeros(len(tb), np.int64)]),
                               np.concatenate([np.full(len(labels), 0.5 / len(labels)), np.full(len(tb), 0.5 / len(tb))]),
                               s.calibration_l2)
    fitted.coef, fitted.offset = a / sd, b0 - float((a * mu / sd).sum())
    q = float(np.quantile(fitted.margin(bg.features, world_oof), 1 - s.max_taken))
    lowered = max(0.0, q + s.taken_margin)
    fitted.offset -= lowered
    return {"background": bg.source, "background_photos": int(len(tb)),
            "background_taken_in_sample": float((fitted.margin(bg.features, world_oof) > 0).mean()),
            "offset_lowered_by": lowered}


def power_of(feats: np.ndarray, background: Background | None, s: Any) -> float:
    """Tukey's power for these features: ``s.tukey`` where every feature is non-negative (a ReLU
    backbone's), else 1 (unit length only)."""
    low = min(float(feats[i : i + POWER_CHUNK].min()) for i in range(0, len(feats), POWER_CHUNK))
    return s.tukey if low >= 0 and (background is None or background.features.min() >= 0) else 1.0


Evidence = tuple[np.ndarray, np.ndarray, np.ndarray]  # out-of-fold class distances, ranker scores, known classes


def without_class(oof: Evidence, labels: np.ndarray, c: int) -> Evidence:
    """All photos' out-of-fold evidence less class ``c``'s photos and column: a left-out-class
    head's own, but for its folds' fits having seen class c (the strangers check's heads take it
    rather than fitting five folds each: 48 of the 60 fits of ten classes)."""
    keep = labels != c
    cols = np.arange(oof[0].shape[1]) != c
    return tuple(x[keep][:, cols] for x in oof)  # type: ignore[return-value]


def fit_calibrated(base: Base, feats: np.ndarray, labels: np.ndarray, classes: list[str], s: Any,
                   background: Background | None, label: str = "training", rows: np.ndarray | None = None,
                   stats: Statistics | None = None, oof: Evidence | None = None) -> Head:
    """A ``calibrated`` head from training features [m, V, D] (``feats[rows]`` when given, read
    without copying them all; ``labels`` are theirs) and the base's world (or None). ``stats``: the
    run's shared :class:`Statistics` of ``feats`` (made here when not given or of another power);
    ``oof``: these photos' out-of-fold evidence when it is already known (:func:`out_of_fold`)."""
    n = len(classes)
    rows = np.arange(len(feats)) if rows is None else np.asarray(rows)
    if background is not None:  # near-copies of a training photo do not judge it
        background = background.without(feats[rows, 0])
        if len(background) < MIN_BACKGROUND:
            background = None
    p = power_of(feats, background, s)
    if stats is None or stats.power != p:
        stats = Statistics(power(feats, p), p)
    centre = feats[rows, 0]
    metric, rw, rb = stats.fit(rows, labels, n, s.gate_shrinkage, s.gate_rank, s.ranker_ridge)
    oof = out_of_fold(stats, rows, labels, n, s) if oof is None else oof
    fitted = Fitted(p, metric, None, rw, rb, np.zeros(4), 0.0, base.weight, base.bias)
    if background is not None:
        figures = _against_world(fitted, base, centre, stats.t[rows, 0], labels, n, oof, background, s)
    else:  # no world to judge against: the gate of the positives alone (README: what this risks)
        own = oof[0][np.arange(len(labels)), labels]
        thr = float(np.quantile(own, 1 - s.gate_quantile))
        fitted.coef = np.array([s.gate_scale / thr, 1.0, 0.0, 0.0])  # h = scale * (1 - d / thr) + (r - max r)
        fitted.offset = s.gate_scale
        figures = {"background": None, "background_photos": 0}
    extras: dict[str, torch.Tensor] = {}
    if fitted.world is not None:
        w = fitted.world
        extras |= {"world_mean": torch.from_numpy(w.means), "world_basis": torch.from_numpy(w.basis),
                   "world_basis_weights": torch.from_numpy(w.weights), "world_sigma": torch.tensor([w.sigma])}
    extras |= {"means": torch.from_numpy(metric.means), "basis": torch.from_numpy(metric.basis),
               "basis_weights": torch.from_numpy(metric.weights), "sigma": torch.tensor([metric.sigma]),
               "power": torch.tensor([p]), "coef": torch.from_numpy(fitted.coef.astype(np.float32)),
               "offset": torch.tensor([fitted.offset])}
    return Head(classes=list(classes), weight=torch.from_numpy(rw), bias=torch.from_numpy(rb), backbone=base.name,
                backbone_digest=base.digest, method="calibrated",
                extras={k: v.float().contiguous() for k, v in extras.items()},
                settings=s.to_dict() | {"evidence": dict(zip(EVIDENCE, map(float, fitted.coef))),
                                        "offset": float(fitted.offset)} | figures)
