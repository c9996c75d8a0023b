"""Our own EfficientNet-Lite in torch, behind a small interface (features, logits, the activation
entering a block, a trainable copy of the top blocks) so nothing else reaches into its layers.

What each pretrained entry is (weights, preprocessing, labels) is data in :mod:`registry`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..config import PreprocessConfig
from ..errors import ExtendserveError
from .registry import BackboneSpec

# --------------------------------------------------------------------------- architecture

# (repeats, kernel, stride, expand ratio, in channels, out channels): the EfficientNet-Lite
# stages, before width/depth scaling.
_LITE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


class SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding, fixed for one input size (the weights were trained in TF)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, in_size: int, groups: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=0, groups=groups, bias=False)
        out = math.ceil(in_size / stride)
        pad = max((out - 1) * stride + k - in_size, 0)
        self.pad = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: ReLU6, no squeeze-excitation."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, in_size: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, 1, in_size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, in_size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, 1, math.ceil(in_size / stride))
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with parameter names matching the published state dicts
    (``_conv_stem``, ``_blocks.N``, ``_conv_head``, ``_fc``), so they load with strict=True.

    ``forward_features`` gives the pooled feature vector, ``forward_head`` the ImageNet logits.
    """

    def __init__(self, width: float, depth: float, image_size: int, num_classes: int = 1000):
        super().__init__()
        size = image_size
        self._conv_stem = SameConv2d(3, 32, 3, 2, size)  # stem and head are not scaled in Lite
        self._bn0 = _bn(32)
        size = math.ceil(size / 2)
        blocks = []
        cin = 32
        for i, (reps, k, stride, expand, _i, out) in enumerate(_LITE_STAGES):
            cout = _round_filters(out, width)
            if 0 < i < len(_LITE_STAGES) - 1:  # Lite keeps first and last stage depth fixed
                reps = int(math.ceil(depth * reps))
            for r in range(reps):
                s = stride if r == 0 else 1
                blocks.append(MBConv(cin, cout, k, s, expand, size))
                size = math.ceil(size / s)
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, 1280, 1, 1, size)
        self._bn1 = _bn(1280)
        self.act = nn.ReLU6()
        self._fc = nn.Linear(1280, num_classes)
        self.num_features = 1280

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and every block: the activation the head conv takes."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return x

    def forward_top(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Blocks from ``start`` on, the head conv and pooling: the feature vector."""
        for block in self._blocks[start:]:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised NCHW float input -> pooled features [B, 1280]."""
        return self.forward_top(self.forward_trunk(x), len(self._blocks))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self._fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def top_copy(self, k: int) -> TopCopy:
        """A trainable copy of the top ``k`` blocks, head conv and pooling (``--unfreeze-top``)."""
        return TopCopy(self, k)


class TopCopy(nn.Module):
    """Blocks ``start..`` plus head conv and pooling; parameter names as in the backbone, so a head
    file's fine-tuned tensors are checked name by name against the model they came from."""

    def __init__(self, model: EfficientNetLite, k: int):
        super().__init__()
        n = model.num_blocks
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


class InputAdapter(nn.Module):
    """uint8 NHWC pixels -> normalised float NCHW, as the backbone was trained (the torch twin of
    the normalisation :mod:`base` puts in front of every base graph)."""

    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        return (x - self.mean) * self.inv_std


ARCHITECTURES = {"efficientnet_lite": EfficientNetLite}


def build(spec: BackboneSpec) -> EfficientNetLite:
    """The registry entry's architecture, untrained."""
    return ARCHITECTURES[spec.arch](**dict(spec.arch_args))
