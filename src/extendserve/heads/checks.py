"""What a head will do, measured before it ships: photos that do not belong, and strangers.

- **Suspicious photos.** A photo much less like the rest of its class than they are like each
  other (its leave-one-out similarity to the class's mean, power-transformed centre features, more
  than ``OUTLIER_Z`` robust deviations below the class's median, the deviation floored at
  ``MAD_FLOOR``), and near-copies filed under two classes. Chosen on the shared photos (`python
  bench/heads/checks_bench.py`): at ``OUTLIER_Z = 5``, ``MAD_FLOOR = 0.04`` the clean folders flag 0
  (faces), 1 (hand signs) and 1 (garments) photos, and an ImageNet photo planted in a class is found
  78% (faces), 100% (signs) and 82% (garments) of the time; the ones not found look like the class.
  Flagged photos are left out of training unless the user keeps them (``--keep-suspicious``).
- **Strangers.** Photos of something like the new classes but none of them (a stranger's face) are
  named as one of them about as often as a class's own photos are when that class is left out:
  each class (up to ``MAX_LEFT_OUT``) is left out in turn, a head is fitted on the others, and the
  share of the left-out photos it names as a new class is the estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..photos.views import VIEWS

OUTLIER_Z = 5.0
MAD_FLOOR = 0.04
DUPLICATE_COS = 0.98  # a pair at least this alike is always a copy
COPY_MIN = 0.92  # ... and never one under this
COPY_MARGIN = 0.02  # between: above the 99.9th percentile of different classes' pairs by this
MAX_LEFT_OUT = 8
STRANGERS_WARN = 0.30


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# centre, centre mirrored, whole photo, whole photo mirrored: their places among the views
COPY_VIEWS = tuple(VIEWS.index(v) for v in ("center", "center-flip", "full", "full-flip"))


def near_copy_scores(a: np.ndarray, b: np.ndarray, views: bool = True) -> np.ndarray:
    """How alike each photo of ``a`` is to each of ``b`` ([n, views, D] features) as a copy: the
    best cosine of the power-transformed features over a's centre and whole views against b's
    centre, whole and mirrored views, so a mirrored, cropped or re-lit copy still scores as one
    (``views=False``: the centre views alone)."""
    if not views or a.shape[1] <= max(COPY_VIEWS) or b.shape[1] <= max(COPY_VIEWS):
        xa, xb = _unit(np.sqrt(np.maximum(a[:, 0], 0))), _unit(np.sqrt(np.maximum(b[:, 0], 0)))
        return xa @ xb.T
    xa = _unit(np.sqrt(np.maximum(a[:, [COPY_VIEWS[0], COPY_VIEWS[2]]], 0)))  # [n, 2, D]
    xb = _unit(np.sqrt(np.maximum(b[:, list(COPY_VIEWS)], 0)))  # [m, 4, D]
    sims = xa.reshape(-1, xa.shape[-1]) @ xb.reshape(-1, xb.shape[-1]).T
    return sims.reshape(len(a), 2, len(b), len(COPY_VIEWS)).max(axis=(1, 3))


def copy_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The near-copy score a pair of photos of two classes must reach: above what photos of different
    classes of this folder reach (their 99.9th percentile, plus COPY_MARGIN), within COPY_MIN ..
    DUPLICATE_COS. Faces and garments differ from class to class (a copy is flagged from 0.92);
    hand signs on one plain background reach 0.96 between classes, where only closer copies are
    told apart (python bench/heads/near_copies.py)."""
    cross = scores[np.triu(labels[:, None] != labels[None], 1)]
    if not cross.size:
        return DUPLICATE_COS
    return float(np.clip(np.quantile(cross, 0.999) + COPY_MARGIN, COPY_MIN, DUPLICATE_COS))


def suspicious(centre: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str],
               base_probs: np.ndarray, base_labels: list[str], views: np.ndarray | None = None,
               outlier_z: float = OUTLIER_Z) -> list[dict[str, Any]]:
    """The photos that look out of place (their row, file name and class), each with its reason and
    how far out it is: ``score`` (robust deviations below its class's typical likeness to the class,
    or a copy's likeness), ``limit`` (what flags it) and ``rank`` (1: the most out of place of all the
    photos). ``views``: every photo's view features [n, views, D], for mirrored, cropped or re-lit copies."""
    x = _unit(np.sqrt(np.maximum(centre, 0)))
    found: dict[int, str] = {}
    cents = np.stack([_unit(x[labels == c].sum(0)) if (labels == c).any() else np.zeros(x.shape[1])
                      for c in range(len(classes))])
    typical, z = _typical(x, labels, len(classes))
    rank = np.empty(len(x), np.int64)
    rank[np.argsort(-z, kind="stable")] = np.arange(1, len(x) + 1)
    how: dict[int, tuple[float, float]] = {}
    for i in np.flatnonzero(z > outlier_z):
        c = int(labels[i])
        sims = cents @ x[i]
        sims[c] = -1
        other = int(sims.argmax())
        top = int(base_probs[i].argmax())
        if other in typical and sims[other] >= typical[other][0] - 2 * typical[other][1]:
            found[i] = f"looks like the photos of '{classes[other]}', not like the other photos of '{classes[c]}'"
        elif base_probs[i, top] >= 0.5:
            found[i] = (f"looks like '{base_labels[top]}' (the base says {base_probs[i, top]:.2f}), not like the "
                        f"other photos of '{classes[c]}'")
        else:
            found[i] = f"unlike the other photos of '{classes[c]}'"
        how[int(i)] = (float(z[i]), outlier_z)
    sim = near_copy_scores(views, views) if views is not None else x @ x.T
    sim = np.maximum(sim, sim.T)  # a copy of either way round
    limit = copy_threshold(sim, labels) if views is not None else DUPLICATE_COS
    a, b = np.nonzero(np.triu(sim >= limit, 1) & (labels[:, None] != labels[None]))
    for i, j in zip(a, b):
        for p, q in ((i, j), (j, i)):
            if int(p) not in found:
                found[int(p)] = f"a near-copy of {names[q]} in '{classes[labels[q]]}'"
                how[int(p)] = (float(sim[i, j]), limit)
    return [{"index": i, "file": names[i], "class": classes[labels[i]], "why": why, "score": round(how[i][0], 3),
             "limit": round(how[i][1], 3), "rank": int(rank[i])} for i, why in sorted(found.items())]


def _typical(x: np.ndarray, labels: np.ndarray, n: int) -> tuple[dict[int, tuple[float, float]], np.ndarray]:
    """Each class's median likeness of a photo to the rest of the class (leave-one-out mean) and its
    robust spread (MAD, floored at MAD_FLOOR), and each photo's deviations below it (0 in classes
    of under 4 photos: too few to say what the class looks like)."""
    typical: dict[int, tuple[float, float]] = {}
    z = np.zeros(len(x))
    for c in range(n):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 4:
            continue
        total = x[idx].sum(0)
        own = np.array([_unit(total - x[i]) @ x[i] for i in idx])
        med = float(np.median(own))
        typical[c] = (med, max(float(np.median(np.abs(own - med))) * 1.4826, MAD_FLOOR))
        z[idx] = (med - own) / typical[c][1]
    return typical, z


def strangers_named(fit_without: Callable[[int], Any], score: Callable[[Any, np.ndarray], np.ndarray],
                    centre: np.ndarray, labels: np.ndarray, n: int, base_count: int, seed: int = 0) -> dict[str, Any] | None:
    """Leave each class out in turn (at most MAX_LEFT_OUT, chosen at random): the share of its
    photos the head fitted on the others names as one of them, and their mean score when named.
    ``fit_without(c)``: a head fitted without class c; ``score(head, feats)``: merged logits."""
    if n < 2:
        return None
    left_out = np.random.default_rng(seed).permutation(n)[:MAX_LEFT_OUT]
    shares, named_scores = [], []
    for c in left_out:
        head = fit_without(int(c))
        logits = score(head, centre[labels == c])
        z = logits - logits.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        named = logits.argmax(1) >= base_count
        shares.append(float(named.mean()))
        named_scores += list(p.max(1)[named])
    return {"strangers_named": float(np.mean(shares)), "strangers_score": float(np.mean(named_scores)) if named_scores else None,
            "classes_left_out": int(len(left_out)),
            "per_class": {int(c): round(s, 3) for c, s in zip(left_out, shares)}}


def trade(held: np.ndarray, labels: np.ndarray, world: np.ndarray, k: int,
          shares: tuple[float, ...] = (0.005, 0.01, 0.03, 0.10)) -> list[dict[str, float]]:
    """New-class held-out accuracy against the share of held-out background taken, the new classes'
    logits lowered or raised until each share is just met: the trade a head makes, made visible."""
    w_gap = world[:, k:].max(1) - world[:, :k].max(1)  # > shift: the new classes take the photo
    h_gap = held[:, k:].max(1) - held[:, :k].max(1)
    right = held[:, k:].argmax(1) == labels
    out = []
    for share in shares:
        for d in np.linspace(-20, 20, 161):  # the shift of the new classes' logits, lowest first
            taken = float((w_gap > d).mean())
            if taken <= share:
                out.append({"max_taken": share, "taken": taken, "accuracy": float((right & (h_gap > d)).mean()),
                            "shift": float(d)})
                break
    return out
