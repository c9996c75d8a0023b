"""Partial unfreezing without forgetting: a private copy of the backbone's top K blocks.

``train-head --unfreeze-top K`` fine-tunes a copy of the last K blocks (and the head conv that
follows them) together with the new classes, on the frozen trunk's activations; the original
blocks are never touched, so the merged model branches: the shared trunk feeds the original top
(ImageNet logits, exactly as before) and the fine-tuned copy (the new head's features). The copy's
tensors travel in the head file as ``extras["top.<backbone parameter name>"]``.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bases.base import PIXELS, Base
from ..errors import ExtendserveError
from ..heads.fit import fit_softmax
from ..heads.gated import fit_gated
from ..heads.head import Head
from ..heads.scoring import PREFIX, merged_logits, scorer, top_from_head
from ..photos.preprocess import read_photo
from ..photos.views import photo_views
from ..progress import progress
from ..sessions import make_session
from .train import TrainReport, classifier, heldout_accuracy, split


def trunk_maps(base: Base, files: Sequence[Path], start: int) -> torch.Tensor:
    """[n, len(VIEWS), C, H, W]: every training view's activation entering block ``start``, read
    off the base graph itself (onnxruntime)."""
    if base.backbone is None or start not in base.taps:
        raise ExtendserveError("--unfreeze-top fine-tunes a built-in backbone's top blocks; it needs --backbone, "
                               "not --base")
    sess = make_session(base.adapted([base.taps[start]]).SerializeToString(), "cpu")
    out = []
    for i, f in enumerate(files):
        v = photo_views(read_photo(f), str(f), base.preprocess)
        out.append(sess.run(None, {PIXELS: v})[0])
        progress("trunk activations", i + 1, len(files))
    return torch.from_numpy(np.stack(out))


def fit_unfrozen(base: Base, maps: torch.Tensor, labels: np.ndarray, classes: list[str], s: Any,
                 k: int, freeze: Sequence[str] = (), label: str = "fine-tuning") -> Head:
    """Fine-tune a top-K copy with an N-way classifier on ``maps`` [n, V, C, H, W], then fit the
    gated head of :mod:`gated` on the copy's features. BatchNorm statistics stay frozen."""
    torch.manual_seed(s.seed)
    top = base.backbone.top_copy(k)
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
    head = fit_gated(base, feats.reshape(len(labels), views_n, -1), labels, classes, s, label)
    head.extras.update({PREFIX + n: t.detach().clone() for n, t in top.state_dict().items()
                        if not n.endswith("num_batches_tracked")})
    head.settings.update({"unfreeze_top": k, "freeze": list(freeze), "frozen_parameters": len(frozen),
                          "fine_tuned_parameters": int(sum(p.numel() for p in trainable))})
    return head


def train_unfrozen(base: Base, files: Sequence[Path], feats: np.ndarray, labels: np.ndarray,
                   classes: list[str], s: Any, k: int, freeze: Sequence[str] = ()) -> tuple[Head, TrainReport]:
    """Like :func:`train.train_head`: a held-out check on a seeded split, then the final head."""
    t0 = time.time()
    report = TrainReport(counts={c: int((labels == i).sum()) for i, c in enumerate(classes)})
    maps = trunk_maps(base, files, base.backbone.num_blocks - k)
    parts = split(labels, s.holdout, s.seed)
    if parts is not None:
        tr, ho = parts
        probe = fit_unfrozen(base, maps[tr], labels[tr], classes, s, k, freeze, "fine-tuning (held-out check)")
        top = top_from_head(base.backbone, probe)
        w, b = classifier(base)
        with torch.no_grad():
            new_feats = top(maps[ho, 0])
            old = torch.from_numpy(feats[ho, 0]).float() @ w.T + b
            logits = merged_logits([scorer(probe)], new_feats, old).numpy()
        report.heldout = heldout_accuracy(logits, labels[ho], classes)
    head = fit_unfrozen(base, maps, labels, classes, s, k, freeze)
    report.seconds = time.time() - t0
    return head, report
