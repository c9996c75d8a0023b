"""Partial unfreezing without forgetting: a private copy of the backbone's top K blocks.

``train-head --unfreeze-top K`` fine-tunes a copy of the last K blocks (and the head conv that
follows them) together with the new classes, on the frozen trunk's activations; the original
blocks are never touched, so the merged model branches: the shared trunk feeds the original top
(ImageNet logits, exactly as before) and the fine-tuned copy (the new head's features). The copy's
tensors travel in the head file as ``extras["top.<backbone parameter name>"]``.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import EfficientNetLite, LoadedBackbone
from .errors import ExtendserveError, HeadFileError
from .features import photo_views, progress
from .head import Head

PREFIX = "top."


class TopCopy(nn.Module):
    """Blocks ``start..`` plus head conv and pooling; parameter names as in the backbone."""

    def __init__(self, model: EfficientNetLite, k: int):
        super().__init__()
        n = len(model._blocks)
        if not 1 <= k <= n:
            raise ExtendserveError(f"--unfreeze-top must be between 1 and {n} for this backbone, not {k}")
        self.start = n - k
        self._blocks = nn.ModuleDict({str(i): copy.deepcopy(model._blocks[i]) for i in range(self.start, n)})
        self._conv_head = copy.deepcopy(model._conv_head)
        self._bn1 = copy.deepcopy(model._bn1)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self._blocks.values():
            x = block(x)
        return self.act(self._bn1(self._conv_head(x))).mean(dim=(2, 3))


def unfrozen(head: Head) -> int:
    return int(head.settings.get("unfreeze_top", 0) or 0)


def top_from_head(backbone: LoadedBackbone, head: Head) -> TopCopy | None:
    """The head's fine-tuned copy, checked tensor by tensor against the backbone's shapes."""
    k = unfrozen(head)
    if not k:
        return None
    top = TopCopy(backbone.model, k)
    state = top.state_dict()
    given = {name[len(PREFIX):]: t for name, t in head.extras.items() if name.startswith(PREFIX)}
    missing = sorted(set(state) - set(given) - {n for n in state if n.endswith("num_batches_tracked")})
    bad = [n for n in given if n in state and tuple(given[n].shape) != tuple(state[n].shape)]
    if missing or bad or set(given) - set(state):
        raise HeadFileError(f"{head.source or head.name}: its fine-tuned top {k} blocks do not fit "
                            f"{backbone.spec.name} (missing {missing[:3]}, wrong shape {bad[:3]}); retrain it")
    top.load_state_dict({**state, **{n: t.to(state[n].dtype) for n, t in given.items()}})
    return top.eval().requires_grad_(False)


class Trunk(nn.Module):
    """uint8 pixels -> the activation entering block ``start``."""

    def __init__(self, backbone: LoadedBackbone, start: int):
        super().__init__()
        from .merge import InputAdapter

        self.adapter = InputAdapter(backbone.spec.preprocess)
        self.model = backbone.model
        self.start = start

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_trunk(self.adapter(pixels), self.start)


def trunk_maps(backbone: LoadedBackbone, files: Sequence[Path], start: int) -> torch.Tensor:
    """[n, len(VIEWS), C, H, W]: every training view through the frozen trunk (onnxruntime)."""
    from .export import export_onnx
    from .runtime import make_session

    sess = make_session(export_onnx(Trunk(backbone, start), backbone.spec.input_size, "trunk"), "cpu")
    cfg = backbone.spec.preprocess
    out = []
    for i, f in enumerate(files):
        v = photo_views(Path(f).read_bytes(), str(f), cfg)
        out.append(sess.run(["trunk"], {"pixels": v})[0])
        progress("trunk activations", i + 1, len(files))
    return torch.from_numpy(np.stack(out))


def fit_unfrozen(backbone: LoadedBackbone, maps: torch.Tensor, labels: np.ndarray, classes: list[str], s,
                 k: int, freeze: Sequence[str] = (), label: str = "fine-tuning") -> Head:
    """Fine-tune a top-K copy with an N-way classifier on ``maps`` [n, V, C, H, W], then fit the
    gated head of :mod:`calibrate` on the copy's features. BatchNorm statistics stay frozen."""
    from .calibrate import fit_gated
    from .train import fit_softmax

    torch.manual_seed(s.seed)
    top = TopCopy(backbone.model, k)
    top.eval().requires_grad_(True)  # eval: BN keeps the pretrained statistics (a few dozen photos
    frozen = []  # cannot re-estimate them); the copied weights start trainable, then --freeze
    for name, p in top.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in freeze):
            p.requires_grad_(False)
            frozen.append(name)
    trainable = [p for p in top.parameters() if p.requires_grad]
    if not trainable:
        raise ExtendserveError(f"--freeze {list(freeze)} leaves nothing of the top {k} blocks to fine-tune; "
                               "narrow the patterns, or use --unfreeze-top 0")
    views_n = maps.shape[1] if s.augment else 1
    x = maps[:, :views_n].reshape(-1, *maps.shape[2:])
    y = torch.from_numpy(np.repeat(labels, views_n)).long()
    with torch.no_grad():
        feats0 = top(x)
    # Start from the frozen-feature solution, so fine-tuning only has to improve on it.
    w, b = fit_softmax(feats0.numpy().reshape(len(labels), views_n, -1), labels, len(classes), s, label + " (start)")
    fc = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        fc.weight.copy_(w)
        fc.bias.copy_(b)
    opt = torch.optim.Adam([{"params": trainable, "lr": s.finetune_lr}, {"params": fc.parameters(), "lr": s.lr * 0.1}])
    gen = torch.Generator().manual_seed(s.seed)
    for epoch in range(s.finetune_epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss = F.cross_entropy(fc(top(x[idx])), y[idx])
            loss.backward()
            opt.step()
        progress(label, epoch + 1, s.finetune_epochs, f"loss {loss.item():.3f}")
    top.requires_grad_(False)
    with torch.no_grad():
        feats = torch.cat([top(x[i : i + 256]) for i in range(0, len(x), 256)]).numpy()
    head = fit_gated(backbone, feats.reshape(len(labels), views_n, -1), labels, classes, s, label)
    head.extras.update({PREFIX + n: t.detach().clone() for n, t in top.state_dict().items()
                        if not n.endswith("num_batches_tracked")})
    head.settings.update({"unfreeze_top": k, "freeze": list(freeze), "frozen_parameters": len(frozen),
                          "fine_tuned_parameters": int(sum(p.numel() for p in trainable))})
    return head


def train_unfrozen(backbone: LoadedBackbone, files: Sequence[Path], feats: np.ndarray, labels: np.ndarray,
                   classes: list[str], s, k: int, freeze: Sequence[str] = ()):  # type: ignore[no-untyped-def]
    """Like :func:`train.train_head`: a held-out check on a seeded split, then the final head."""
    from .train import TrainReport, heldout_accuracy, split

    t0 = time.time()
    report = TrainReport(counts={c: int((labels == i).sum()) for i, c in enumerate(classes)})
    maps = trunk_maps(backbone, files, len(backbone.model._blocks) - k)
    parts = split(labels, s.holdout, s.seed)
    if parts is not None:
        tr, ho = parts
        probe = fit_unfrozen(backbone, maps[tr], labels[tr], classes, s, k, freeze, "fine-tuning (held-out check)")
        top = top_from_head(backbone, probe)
        with torch.no_grad():
            new_feats = top(maps[ho, 0])
            base = torch.from_numpy(feats[ho, 0]).float()
            old = backbone.model.forward_head(base)
            logits = torch.cat([old, probe.scorer()(new_feats, old)], 1).numpy()
        report.heldout = heldout_accuracy(logits, labels[ho], classes)
    head = fit_unfrozen(backbone, maps, labels, classes, s, k, freeze)
    report.seconds = time.time() - t0
    return head, report
