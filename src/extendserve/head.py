"""Head files: the new classes' rows, stored as tensors and plain data only.

A head file is untrusted input: it is read with ``torch.load(weights_only=True)``, which refuses
any pickled object that is not a tensor or plain container, so no code in it can run.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BadImageError, ExtendserveError, HeadFileError
from .names import check_class_names
from .preprocess import read_regular_file

FORMAT = "extendserve-head"
VERSION = 1


@dataclass
class Head:
    """N new classes on top of a backbone's D features.

    ``method`` says how the merged model scores them: ``joint`` places the linear logits
    beside the ImageNet logits as they are (trained inside the joint softmax); ``gated`` adds the
    calibration of :mod:`extendserve.calibrate`, whose tensors live in ``extras``.
    """

    classes: list[str]
    weight: torch.Tensor  # [N, D]
    bias: torch.Tensor  # [N]
    backbone: str
    backbone_digest: str | None = None  # None: trained elsewhere, unknown
    method: str = "joint"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    name: str = "head"
    source: str | None = None  # the file it was read from

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.weight, self.bias, *[self.extras[k] for k in sorted(self.extras)]):
            h.update(t.detach().contiguous().numpy().tobytes())
        h.update("\n".join(self.classes).encode())
        h.update(self.method.encode())
        return h.hexdigest()

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "classes": list(self.classes),
            "weight": self.weight.detach().float().contiguous(),
            "bias": self.bias.detach().float().contiguous(),
            "feature_dim": self.feature_dim,
            "backbone": self.backbone,
            "backbone_digest": self.backbone_digest,
            "method": self.method,
            "extras": {k: v.detach().float().contiguous() for k, v in self.extras.items()},
            "settings": self.settings,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a crash never leaves a half-written head file behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(self.to_payload(), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def scorer(self) -> nn.Module:
        if self.method == "joint":
            return LinearScorer(self.weight, self.bias)
        if self.method == "gated":
            from .calibrate import GatedScorer

            return GatedScorer(self)
        raise HeadFileError(f"{self.source or self.name}: unknown head method {self.method!r}")

    def check_fits(self, backbone: str, feature_dim: int, digest: str, force: bool = False) -> None:
        """Refuse a head that was trained on other features than the ones it would receive."""
        where = self.source or self.name
        if self.feature_dim != feature_dim:
            raise HeadFileError(
                f"{where}: the head takes {self.feature_dim} features but backbone {backbone!r} "
                f"gives {feature_dim}; train the head on {backbone!r} "
                f"(extendserve train-head DATA --backbone {backbone})"
            )
        if self.backbone != backbone:
            raise HeadFileError(
                f"{where}: the head was trained on backbone {self.backbone!r}, not {backbone!r}; "
                f"build with --backbone {self.backbone} or retrain the head"
            )
        if self.backbone_digest and self.backbone_digest != digest:
            msg = (
                f"{where}: the head was trained on other weights of {backbone!r} "
                f"(digest {self.backbone_digest[:12]}, these are {digest[:12]})"
            )
            if not force:
                raise HeadFileError(msg + "; retrain the head, or pass --force to build anyway")
            import warnings

            warnings.warn(msg + "; building anyway because of --force", stacklevel=2)


class LinearScorer(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, feats: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


# --------------------------------------------------------------------------- reading


MAX_HEAD_BYTES = 2 * 1024**3


def safe_load(path: Path, what: str = "head file") -> Any:
    """``torch.load(weights_only=True)`` of a regular file that looks like a PyTorch file; every
    failure is a :class:`HeadFileError` saying what the file is and what to give instead."""
    p = Path(path)
    if not p.exists():
        raise HeadFileError(f"{path}: no such file")
    if p.is_dir():
        raise HeadFileError(f"{path}: is a directory, expected a {what} (.pt)")
    if not p.is_file():
        raise HeadFileError(f"{path}: not a regular file (a device, FIFO or socket); give a {what} (.pt)")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise HeadFileError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if not magic:
        raise HeadFileError(f"{path}: the file is empty (0 bytes); give a {what} written by torch.save "
                            "(extendserve train-head writes one)")
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch's zip format, or a legacy pickle
        kind = _sniff(magic)
        raise HeadFileError(f"{path}: not a PyTorch file{' (it looks like ' + kind + ')' if kind else ''}; give a "
                            f"{what} written by torch.save (extendserve train-head writes one)")
    try:
        data = read_regular_file(path, MAX_HEAD_BYTES, what)
    except BadImageError as e:
        raise HeadFileError(str(e)) from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise HeadFileError(
            f"{path}: refused: the file holds pickled Python objects other than tensors and plain "
            "data, which could run code when loaded; it is not loaded. Re-save it as tensors only "
            "(torch.save(model.state_dict(), ...)) where it was made"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, IndexError,
            KeyError, TypeError) as e:
        raise HeadFileError(
            f"{path}: not a readable PyTorch file, it is corrupt or truncated "
            f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        ) from None


def _sniff(magic: bytes) -> str:
    for sig, kind in ((b"\xff\xd8", "a JPEG photo"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
                      (b"%PDF", "a PDF")):
        if magic.startswith(sig):
            return kind
    if all(32 <= b < 127 or b in (9, 10, 13) for b in magic):
        return "text"
    return ""


def _find_linear(state: dict[str, Any], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("", "fc."):
        if f"{prefix}weight" in tensors and f"{prefix}bias" in tensors:
            return tensors[f"{prefix}weight"], tensors[f"{prefix}bias"]
    weights = [k for k in tensors if k.endswith(".weight")]
    if len(weights) == 1 and len(tensors) == 2:
        prefix = weights[0][: -len("weight")]
        if f"{prefix}bias" in tensors:
            return tensors[weights[0]], tensors[f"{prefix}bias"]
    raise HeadFileError(
        f"{path}: no linear layer found; expected keys 'weight' and 'bias', 'fc.weight' and "
        f"'fc.bias', or one Linear layer's '<name>.weight'/'<name>.bias' (found: "
        f"{', '.join(sorted(tensors)[:8]) or 'no tensors'})"
    )


def read_classes_file(path: str | os.PathLike[str]) -> list[str]:
    try:
        lines = read_regular_file(path, 64 * 1024**2, "class list").decode("utf-8").splitlines()
    except (BadImageError, UnicodeDecodeError) as e:
        raise HeadFileError(f"{path}: cannot read the class list ({e})") from None
    return [ln.strip() for ln in lines if ln.strip()]


def load_head(
    path: str | os.PathLike[str],
    classes_file: str | os.PathLike[str] | None = None,
    backbone: str | None = None,
) -> Head:
    """Read a head file of ours, or a foreign state dict plus a class list (one name a line)."""
    path = Path(path)
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise HeadFileError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        try:
            head = Head(
                classes=[str(c) for c in obj["classes"]],
                weight=obj["weight"].float(),
                bias=obj["bias"].float(),
                backbone=str(obj["backbone"]),
                backbone_digest=obj.get("backbone_digest"),
                method=str(obj.get("method", "joint")),
                extras=dict(obj.get("extras", {})),
                settings=dict(obj.get("settings", {})),
                name=str(obj.get("name") or path.stem),
            )
        except (KeyError, AttributeError, TypeError) as e:
            raise HeadFileError(f"{path}: incomplete head file (missing or bad {e})") from None
        if classes_file is not None:
            head.classes = read_classes_file(classes_file)
    else:
        weight, bias = _find_linear(obj, path)
        if classes_file is None:
            raise HeadFileError(
                f"{path}: a head trained elsewhere carries no class names; pass --classes FILE "
                "with one name per line, in the order of the weight's rows"
            )
        from .config import DEFAULT_BACKBONE

        head = Head(
            classes=read_classes_file(classes_file),
            weight=weight.float(),
            bias=bias.float(),
            backbone=backbone or DEFAULT_BACKBONE,
            name=path.stem,
            settings={"origin": "foreign state dict"},
        )
    head.source = str(path)
    _validate(head, path)
    return head


def _validate(head: Head, path: Path) -> None:
    w, b = head.weight, head.bias
    if w.ndim != 2 or b.ndim != 1 or w.shape[0] != b.shape[0]:
        raise HeadFileError(
            f"{path}: weight must be [N, D] and bias [N]; found {tuple(w.shape)} and {tuple(b.shape)}"
        )
    if not head.classes:
        raise HeadFileError(f"{path}: the head has no class names; give at least one class")
    if len(head.classes) != w.shape[0]:
        raise HeadFileError(
            f"{path}: {len(head.classes)} class names for {w.shape[0]} weight rows; "
            "give one name per row"
        )
    try:
        check_class_names(head.classes, str(path))
    except ExtendserveError as e:
        raise HeadFileError(str(e)) from None
    if not torch.isfinite(w).all() or not torch.isfinite(b).all():
        raise HeadFileError(f"{path}: the weights contain NaN or infinity; retrain the head")
