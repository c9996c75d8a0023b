"""Head files: the new classes' rows, stored as tensors and plain data only.

A head file is untrusted input: it is read with ``torch.load(weights_only=True)``, which refuses
any pickled object that is not a tensor or plain container, so no code in it can run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bases.checkpoint import safe_load
from ..errors import ExtendserveError, HeadFileError
from ..files import write_atomic
from ..names import check_class_names, read_names

FORMAT = "extendserve-head"
VERSION = 1
KEYS = {"format", "version", "name", "classes", "weight", "bias", "feature_dim", "backbone", "backbone_digest",
        "method", "extras", "settings"}  # what a head file of ours holds; anything else is refused


@dataclass
class Head:
    """N new classes on top of a backbone's D features.

    ``method`` says how the merged model scores them: ``joint`` places the linear logits
    beside the ImageNet logits as they are (trained inside the joint softmax); ``gated`` adds the
    calibration of :mod:`extendserve.heads.gated`, whose tensors live in ``extras``.
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
        """Covers every field a build uses: tensors, classes, method, and (since 2026-12) the
        settings, base and extras' names, so a changed setting is a changed head."""
        h = self._tensor_digest()
        h.update(b"\0v2\0" + json.dumps({"settings": self.settings, "backbone": self.backbone,
                                          "backbone_digest": self.backbone_digest, "extras": sorted(self.extras)},
                                         sort_keys=True, default=str).encode())
        return h.hexdigest()

    def legacy_digest(self) -> str:
        """What models built before 2026-12 recorded: tensors, classes and method only."""
        return self._tensor_digest().hexdigest()

    def _tensor_digest(self) -> Any:
        h = hashlib.sha256()
        for t in (self.weight, self.bias, *[self.extras[k] for k in sorted(self.extras)]):
            h.update(t.detach().contiguous().numpy().tobytes())
        h.update("\n".join(self.classes).encode())
        h.update(self.method.encode())
        return h

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
        write_atomic(path, self.to_bytes(), sync=True)

    def to_bytes(self) -> bytes:
        """The head file's bytes: what a built model carries in ``heads/`` to be rebuilt from."""
        import io

        buf = io.BytesIO()
        torch.save(self.to_payload(), buf)
        return buf.getvalue()

    def check_fits(self, base: str, feature_dim: int, digest: str, force: bool = False) -> None:
        """Refuse a head that was trained on other features than the ones it would receive: the
        base's digest (weights of a built-in backbone, or the ONNX file) decides; names only
        explain."""
        where = self.source or self.name
        if self.feature_dim != feature_dim:
            raise HeadFileError(
                f"{where}: the head takes {self.feature_dim} features but base {base!r} gives {feature_dim}; "
                f"train the head on {base!r} (extendserve train-head DATA with the same --backbone or --base)"
            )
        if self.backbone_digest and self.backbone_digest == digest:
            return
        if self.backbone != base:
            raise HeadFileError(
                f"{where}: the head was trained on base {self.backbone!r}, not {base!r}; "
                f"build with the base it was trained on (--backbone {self.backbone} or --base FILE) or retrain the head"
            )
        if self.backbone_digest:
            msg = (f"{where}: the head was trained on other weights of {base!r} "
                   f"(digest {self.backbone_digest[:12]}, these are {digest[:12]})")
            if not force:
                raise HeadFileError(msg + "; retrain the head, or pass --force to build anyway")
            import warnings

            warnings.warn(msg + "; building anyway because of --force", stacklevel=2)


    def check_identity(self, identity: dict[str, Any]) -> None:
        """Refuse a head trained with other preprocessing or beside other labels than the base it
        is built on has (heads written before these were recorded are not checked)."""
        trained = (self.settings or {}).get("base_model") or {}
        where = self.source or self.name
        if "preprocess" in trained and _values(trained["preprocess"]) != _values(identity["preprocess"]):
            raise HeadFileError(
                f"{where}: the head was trained with preprocessing {_short(trained['preprocess'])}, but this base "
                f"has {_short(identity['preprocess'])}; build with the --preprocess it was trained with, or retrain it")
        if "labels_sha256" in trained and trained["labels_sha256"] != identity["labels_sha256"]:
            raise HeadFileError(f"{where}: the head was trained beside other labels of the base (sha256 "
                                f"{trained['labels_sha256'][:12]}, these are {identity['labels_sha256'][:12]}); "
                                "build with the --labels it was trained with, or retrain it")


def _values(pre: dict[str, Any]) -> Any:
    """Preprocessing compared by what it does, whichever units it was written in."""
    from ..config import PreprocessConfig

    try:
        return PreprocessConfig.from_dict(pre)
    except (KeyError, TypeError, ValueError):
        return pre


def _short(pre: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in pre.items())


# --------------------------------------------------------------------------- reading


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
        return read_names(path, "class list")
    except ExtendserveError as e:
        raise HeadFileError(str(e)) from None


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
        extra = sorted(str(k)[:40] for k in obj if k not in KEYS)
        if extra:
            raise HeadFileError(f"{path}: refused: a head file holds no {', '.join(extra[:3])}; give the file train-head wrote")
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
        from ..bases.registry import DEFAULT_BACKBONE

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
