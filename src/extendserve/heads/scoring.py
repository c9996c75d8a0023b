"""New-class scoring, in one place: how each head method turns features (and the base's own
logits) into its classes' logits, as a torch module, and that module exported as the head's own
small ONNX graph, which :mod:`merge` wires beside the untouched base graph.

- ``joint`` (also ``naive``): the linear rows, as they are.
- ``calibrated`` (the default): see :mod:`calibrated`: LSE(base logits) + h_k, so the softmax
  over all outputs is one probability model for old and new classes.
- ``gated``: see :mod:`gated`: max(base logits) + scale * gate margin + (ranker - max ranker).
- a head trained with ``--unfreeze-top K`` starts from the activation entering block ``n - K`` of
  the built-in backbone and brings its own fine-tuned copy of the top blocks (:class:`TopCopy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx
import torch
from torch import nn

from ..bases.backbone import EfficientNetLite, InputAdapter, TopCopy
from ..bases.onnx_export import export_module
from ..config import PreprocessConfig
from ..errors import ExtendserveError, HeadFileError
from .head import Head

PREFIX = "top."  # head.extras keys of a fine-tuned top copy


class LinearScorer(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, feats: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


class GatedScorer(nn.Module):
    """The in-graph half of :func:`fit_gated`; see the module docstring for the formula. Which gate
    a head carries is read from its tensors (heads from before the Mahalanobis gate stay cosine)."""

    def __init__(self, head: Head):
        super().__init__()
        ex = head.extras
        n, d = head.weight.shape
        self.mahalanobis = "basis" in ex
        r = ex["basis"].shape[-1] if self.mahalanobis else 0
        shapes = ({"means": (n, d), "basis": (d, r), "basis_weights": (r,), "sigma": (1,)} if self.mahalanobis
                  else {"prototypes": (n, d)}) | {"thresholds": (n,), "scale": (1,)}
        for key, shape in shapes.items():
            if key not in ex or tuple(ex[key].shape) != shape:
                raise HeadFileError(
                    f"{head.source or head.name}: gated head lacks a valid {key!r} {shape}; retrain it"
                )
        if self.mahalanobis and not (float(ex["sigma"]) > 0 and bool((ex["thresholds"] > 0).all())):
            raise HeadFileError(f"{head.source or head.name}: gated head has a non-positive sigma or threshold; retrain it")
        self.ranker = nn.Linear(d, n)
        with torch.no_grad():
            self.ranker.weight.copy_(head.weight)
            self.ranker.bias.copy_(head.bias)
        for key in ("prototypes", "thresholds", "scale"):
            if key in shapes:
                self.register_buffer(key, ex[key].float())
        if self.mahalanobis:
            self.distances = Distances(ex["means"], ex["basis"], ex["basis_weights"], ex["sigma"])

    def gate(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, 1]: the best class's margin past its threshold (> 0: the gate passes)."""
        unit = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if not self.mahalanobis:
            return (unit @ self.prototypes.T - self.thresholds).amax(dim=1, keepdim=True)
        dist = self.distances(unit)
        return (1 - dist / self.thresholds).amax(dim=1, keepdim=True)

    def forward(self, feats: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        r = self.ranker(feats)
        top = old_logits.amax(dim=1, keepdim=True)
        return top + self.scale * self.gate(feats) + (r - r.amax(dim=1, keepdim=True))


class Distances(nn.Module):
    """[B, D] unit features -> [B, n] shrunk-covariance Mahalanobis distances to n means
    (metric.Metric.distances), as matrix products over all classes at once, in float64: the
    cost stays a small fraction of the backbone's at 1000 classes, and the difference of sums it
    takes does not cancel (in float32 it moved a gate by 3e-3 logits between CPU kinds)."""

    def __init__(self, means: torch.Tensor, basis: torch.Tensor, weights: torch.Tensor, sigma: torch.Tensor):
        super().__init__()
        m, v, w = means.double(), basis.double(), weights.double()
        mv = m @ v
        self.register_buffer("means_t", m.T.contiguous())
        self.register_buffer("means_sq", (m * m).sum(1)[None])
        self.register_buffer("basis", v)
        self.register_buffer("weights", w)
        self.register_buffer("weighted_means_t", (mv * w).T.contiguous())
        self.register_buffer("weighted_means_sq", (mv * mv * w).sum(1)[None])
        self.register_buffer("inv_sigma", 1.0 / sigma.double().reshape(1, 1))

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        u = unit.double()
        uv = u @ self.basis
        sq = (u * u).sum(1, keepdim=True) - 2.0 * (u @ self.means_t) + self.means_sq
        proj = (uv * uv * self.weights).sum(1, keepdim=True) - 2.0 * (uv @ self.weighted_means_t) + self.weighted_means_sq
        return ((sq - proj).clamp_min(0.0) * self.inv_sigma).float()


# Below odds of 1e-3 a new class is taken not to apply: its log-odds drop by FLOOR_DROP there, so a
# photo of something else gets the base's own scores to within 1e-6, not merely to within 0.1%. No
# top-1 changes: a new class wins only with odds above p_base(top) >= 1/K, which is >= 1e-3 for K <= 1000.
FLOOR = math.log(1e-3)
FLOOR_DROP = 30.0


class CalibratedScorer(nn.Module):
    """The in-graph half of :mod:`calibrated`: new logit k = LSE(base logits) + h_k, with h_k the
    weighted evidence (class distance, ranker, world distance, base confidence) plus offset."""

    def __init__(self, head: Head):
        super().__init__()
        ex = head.extras
        n, d = head.weight.shape
        r = ex["basis"].shape[-1] if "basis" in ex and ex["basis"].ndim == 2 else 0
        shapes = {"means": (n, d), "basis": (d, r), "basis_weights": (r,), "sigma": (1,), "power": (1,),
                  "coef": (4,), "offset": (1,)}
        self.world = "world_mean" in ex
        if self.world:
            rw = ex["world_basis"].shape[-1] if ex["world_basis"].ndim == 2 else 0
            shapes |= {"world_mean": (1, d), "world_basis": (d, rw), "world_basis_weights": (rw,), "world_sigma": (1,)}
        for key, shape in shapes.items():
            if key not in ex or tuple(ex[key].shape) != shape or not bool(torch.isfinite(ex[key]).all()):
                raise HeadFileError(f"{head.source or head.name}: calibrated head lacks a valid {key!r} {shape}; retrain it")
        if not (float(ex["sigma"]) > 0 and (not self.world or float(ex["world_sigma"]) > 0) and 0 < float(ex["power"]) <= 1):
            raise HeadFileError(f"{head.source or head.name}: calibrated head has a non-positive sigma or a power "
                                "outside (0, 1]; retrain it")
        self.p = float(ex["power"])
        self.ranker = nn.Linear(d, n)
        with torch.no_grad():
            self.ranker.weight.copy_(head.weight)
            self.ranker.bias.copy_(head.bias)
        for key in ("coef", "offset"):
            self.register_buffer(key, ex[key].float())
        self.distances = Distances(ex["means"], ex["basis"], ex["basis_weights"], ex["sigma"])
        if self.world:
            self.world_distances = Distances(ex["world_mean"], ex["world_basis"], ex["world_basis_weights"],
                                             ex["world_sigma"])

    def forward(self, feats: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        x = feats.clamp_min(0).pow(self.p) if self.p != 1 else feats
        unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = self.distances(unit)
        r = self.ranker(unit)
        top = old_logits.amax(dim=1, keepdim=True)
        # written out rather than torch.logsumexp: OpenVINO 2026.4 reads the exported
        # ReduceLogSumExp with the wrong shape ([1, 1] for a batch), which moved new logits by 2.3
        lse = top + (old_logits - top).exp().sum(dim=1, keepdim=True).log()
        conf = top - lse
        c = self.coef
        h = -c[0] * d + c[1] * (r - r.amax(dim=1, keepdim=True)) + c[3] * conf + self.offset
        if self.world:
            h = h + c[2] * self.world_distances(unit)
        return lse + h - FLOOR_DROP * (h < FLOOR).to(h.dtype)


def scorer(head: Head) -> nn.Module:
    """(features [B, D], base logits [B, K]) -> the head's logits [B, N]."""
    if head.method == "joint":
        return LinearScorer(head.weight, head.bias).eval()
    if head.method == "gated":
        return GatedScorer(head).eval()
    if head.method == "calibrated":
        return CalibratedScorer(head).eval()
    raise HeadFileError(f"{head.source or head.name}: unknown head method {head.method!r}")


def unfrozen(head: Head) -> int:
    return int(head.settings.get("unfreeze_top", 0) or 0)


def top_from_head(backbone: EfficientNetLite, head: Head) -> TopCopy | None:
    """The head's fine-tuned copy, checked tensor by tensor against the backbone's shapes."""
    k = unfrozen(head)
    if not k:
        return None
    top = backbone.top_copy(k)
    state = top.state_dict()
    given = {name[len(PREFIX):]: t for name, t in head.extras.items() if name.startswith(PREFIX)}
    missing = sorted(set(state) - set(given) - {n for n in state if n.endswith("num_batches_tracked")})
    bad = [n for n in given if n in state and tuple(given[n].shape) != tuple(state[n].shape)]
    if missing or bad or set(given) - set(state):
        raise HeadFileError(f"{head.source or head.name}: its fine-tuned top {k} blocks do not fit "
                            f"this backbone (missing {missing[:3]}, wrong shape {bad[:3]}); retrain it")
    top.load_state_dict({**state, **{n: t.to(state[n].dtype) for n, t in given.items()}})
    return top.eval().requires_grad_(False)


class HeadGraph(nn.Module):
    """What one head adds to the merged model: its inputs are tensors of the base graph."""

    def __init__(self, head: Head, backbone: EfficientNetLite | None):
        super().__init__()
        self.scorer = scorer(head)
        if unfrozen(head) and backbone is None:
            raise HeadFileError(f"{head.source or head.name}: trained with --unfreeze-top, which needs the "
                                "built-in backbone it was fine-tuned from; build with --backbone, not --base")
        self.top = top_from_head(backbone, head) if unfrozen(head) else None

    def forward(self, feats: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        own = self.top(feats) if self.top is not None else feats  # feats: the tap, for a top copy
        return self.scorer(own, old_logits)


def head_graph(head: Head, backbone: EfficientNetLite | None, in_shape: tuple[int, ...], classes: int,
               opset: int) -> onnx.ModelProto:
    """The head as its own ONNX model with inputs ``features`` (the base's features, or the tapped
    activation for a top copy), ``old_logits`` [B, K] and output ``new_logits`` [B, N]."""
    if not 9 <= opset <= 20:
        raise ExtendserveError(f"the base model uses ONNX opset {opset}; heads can be written for opsets 9 to 20; "
                               "convert the base (onnx.version_converter) to opset 17")
    data = export_module(HeadGraph(head, backbone), (torch.zeros(2, *in_shape), torch.zeros(2, classes)),
                         ["features", "old_logits"], ["new_logits"], opset)
    return onnx.load_from_string(data)


def merged_logits(scorers: Sequence[nn.Module], feats: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """The merged model's logits from the base's features and logits: old columns first, each
    head's after (the one torch statement of what the ONNX graph concatenates)."""
    return torch.cat([old_logits] + [s(feats, old_logits) for s in scorers], 1)


class TorchMerged(nn.Module):
    """The merged model in torch alone, uint8 pixels -> [B, K + N] logits: the reference the ONNX
    graph is verified against, and what tests and benchmarks compare with (heads on the features;
    a ``--unfreeze-top`` head is verified on the base graph's own tap instead, see verify)."""

    def __init__(self, backbone: EfficientNetLite, preprocess: PreprocessConfig, heads: Sequence[Head] = ()):
        super().__init__()
        if any(unfrozen(h) for h in heads):
            raise ExtendserveError("TorchMerged scores heads on the features; a --unfreeze-top head reads a tap")
        self.adapter = InputAdapter(preprocess)
        self.model = backbone
        self.scorers = nn.ModuleList([scorer(h) for h in heads])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(self.adapter(pixels))
        return merged_logits(self.scorers, feats, self.model.forward_head(feats))
