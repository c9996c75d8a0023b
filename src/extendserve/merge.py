"""The merged model: one backbone pass feeding the original classifier and every new head.

Input contract (shared with ``model.onnx``): uint8 [batch, crop, crop, 3] RGB after resize and
centre crop. Normalisation happens here, inside the graph, so clients send bytes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .backbone import LoadedBackbone
from .config import PreprocessConfig
from .head import Head


class InputAdapter(nn.Module):
    """uint8 NHWC pixels -> normalised float NCHW, as the backbone was trained."""

    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        return (x - self.mean) * self.inv_std


class FeatureModel(nn.Module):
    """uint8 pixels -> pooled backbone features; what ``train-head`` extracts."""

    def __init__(self, backbone: LoadedBackbone):
        super().__init__()
        self.adapter = InputAdapter(backbone.spec.preprocess)
        self.backbone = backbone.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(self.adapter(pixels))


class MergedModel(nn.Module):
    """pixels -> [original 1000 logits | head A | head B ...] from one shared trunk.

    A head trained with ``--unfreeze-top K`` brings its own fine-tuned copy of the top K blocks:
    it branches off the trunk where those blocks start, while the original top blocks keep
    feeding the ImageNet classifier, so the first 1000 outputs stay the original logits.
    """

    def __init__(self, backbone: LoadedBackbone, heads: Sequence[Head]):
        super().__init__()
        from .finetune import top_from_head

        self.features = FeatureModel(backbone)
        self.heads = nn.ModuleList([h.scorer() for h in heads])
        tops = [top_from_head(backbone, h) for h in heads]
        self.tops = nn.ModuleList([t if t is not None else nn.Identity() for t in tops])
        self.starts = [t.start if t is not None else None for t in tops]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        bb = self.features.backbone
        taps = sorted({s for s in self.starts if s is not None})
        if taps:
            feats, saved = bb.forward_tapped(self.features.adapter(pixels), taps)
        else:
            feats, saved = self.features(pixels), {}
        old = bb.forward_head(feats)
        if not len(self.heads):
            return old
        outs = [old]
        for head, top, start in zip(self.heads, self.tops, self.starts):
            own = feats if start is None else top(saved[start])
            outs.append(head(own, old))
        return torch.cat(outs, dim=1)
