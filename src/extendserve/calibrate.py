"""Calibrated placement of new classes beside the original 1000 logits.

A head trained on its own lives on another logit scale, and one trained inside the joint softmax
wins on about half of all ImageNet photos: neither knows where the new classes' photos *are* in
feature space. The gated head does, with two parts:

- a gate: cosine similarity of the photo's features to each new class's prototype (the mean of
  its normalised training features). Its threshold comes from the positives alone, leave-one-out:
  the ``gate_quantile`` of each training photo's similarity to its class prototype computed
  without it, so it predicts how held-out photos will score. With ``--negatives`` the threshold
  is moved to where it best separates the positives from the negatives.
- a ranker: an N-way softmax classifier on the same features, that says *which* new class.

In the graph, with M the largest original logit, gate g = max_k(sim_k - t_k):

    new_logit_j = M + scale * g + (r_j - max r)

so the best new class beats every ImageNet class exactly when the gate passes, its softmax score
grows smoothly with the margin, and the 1000 original logits are untouched.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .backbone import LoadedBackbone
from .head import Head


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prototypes(feats: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Per class: mean of the unit-normalised features of all views, normalised. [n, D]"""
    return _unit(np.stack([_unit(feats[labels == c]).reshape(-1, feats.shape[-1]).mean(0) for c in range(n)]))


def loo_similarities(feats: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Each photo's centre-view similarity to its class prototype built without that photo."""
    unit = _unit(feats)  # [m, V, D]
    sums = {c: unit[labels == c].reshape(-1, feats.shape[-1]).sum(0) for c in range(n)}
    counts = {c: int((labels == c).sum()) * feats.shape[1] for c in range(n)}
    sims = np.empty(len(feats))
    for i, c in enumerate(labels):
        if counts[c] > feats.shape[1]:
            sims[i] = float(unit[i, 0] @ _unit(sums[c] - unit[i].sum(0)))
        else:  # a lone photo: each view against the mean of its other views, the hardest one
            v = unit[i]
            sims[i] = float(min(v[j] @ _unit(v.sum(0) - v[j]) for j in range(len(v))))
    return sims


def choose_threshold(pos: np.ndarray, quantile: float, neg: np.ndarray | None) -> float:
    """Positives only: their ``quantile``. With negatives, never below what lets 1% of them in:
    negatives only ever raise the gate (a first version that traded them off against the
    positives stole 6% of unseen ImageNet photos)."""
    t = float(np.quantile(pos, quantile))
    if neg is None or not len(neg):
        return t
    return max(t, float(np.quantile(neg, 0.99)))


def fit_gated(
    backbone: LoadedBackbone,
    feats: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    s,  # TrainSettings (not imported: train imports this module)
    label: str = "training",
    negatives: np.ndarray | None = None,
) -> Head:
    from .train import fit_softmax

    n = len(classes)
    w, b = fit_softmax(feats, labels, n, s, label)
    protos = prototypes(feats, labels, n)
    pos = loo_similarities(feats, labels, n)
    neg = None
    if negatives is not None and len(negatives):
        neg = (_unit(negatives[:, 0]) @ protos.T).max(1)
    t = choose_threshold(pos, s.gate_quantile, neg)
    return Head(
        classes=list(classes),
        weight=w,
        bias=b,
        backbone=backbone.spec.name,
        backbone_digest=backbone.digest,
        method="gated",
        extras={
            "prototypes": torch.from_numpy(protos).float(),
            "thresholds": torch.full((n,), t, dtype=torch.float32),
            "scale": torch.tensor([s.gate_scale], dtype=torch.float32),
        },
        settings=s.to_dict() | {"gate_threshold": t, "positives_loo_accept": float((pos > t).mean()),
                                "negatives_accept": None if neg is None else float((neg > t).mean())},
    )


class GatedScorer(nn.Module):
    """The in-graph half of :func:`fit_gated`; see the module docstring for the formula."""

    def __init__(self, head: Head):
        super().__init__()
        ex = head.extras
        n, d = head.weight.shape
        for key, shape in (("prototypes", (n, d)), ("thresholds", (n,)), ("scale", (1,))):
            if key not in ex or tuple(ex[key].shape) != shape:
                from .errors import HeadFileError

                raise HeadFileError(
                    f"{head.source or head.name}: gated head lacks a valid {key!r} {shape}; retrain it"
                )
        self.ranker = nn.Linear(d, n)
        with torch.no_grad():
            self.ranker.weight.copy_(head.weight)
            self.ranker.bias.copy_(head.bias)
        self.register_buffer("prototypes", ex["prototypes"].float())
        self.register_buffer("thresholds", ex["thresholds"].float())
        self.register_buffer("scale", ex["scale"].float())

    def forward(self, feats: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        unit = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
        gate = (unit @ self.prototypes.T - self.thresholds).amax(dim=1, keepdim=True)
        r = self.ranker(feats)
        top = old_logits.amax(dim=1, keepdim=True)
        return top + self.scale * gate + (r - r.amax(dim=1, keepdim=True))
