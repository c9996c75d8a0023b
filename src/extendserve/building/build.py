"""Building a model in memory: the heads checked against the base and each other, wired to it,
merged into one ONNX graph, verified, and described by its manifest. Nothing is written here
(:mod:`publish` writes), so a build that fails verification leaves no trace."""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..bases.base import PIXELS, Base
from ..bases.world import background_for
from ..errors import BuildError, ExtendserveError
from ..heads.head import Head
from ..heads.scoring import unfrozen
from ..names import check_class_names
from ..training.train import taken_share
from .manifest import BASE_HEAD_NAMES, HEADS_DIR, HeadEntry, Manifest, without_paths
from .merge import OUTPUT, merged_model, metadata, wire
from .verify import verification_inputs, verify


@dataclass(frozen=True)
class BuiltModel:
    """A verified model, not yet written: what :func:`publish.publish` writes."""

    onnx_bytes: bytes
    manifest: Manifest
    head_files: dict[str, bytes]  # relative path -> a head file's bytes (heads/NAME.pt)

    def files(self) -> dict[str, bytes]:
        return {"model.onnx": self.onnx_bytes, "manifest.json": self.manifest.to_bytes(), **self.head_files}


def check_heads(base: Base, heads: Sequence[Head]) -> None:
    """Class names unique across the base and every head, head names unique and not the base's."""
    names = [c for h in heads for c in h.classes]
    try:
        check_class_names(names, "the new heads' classes, together", taken=base.labels, taken_by=f"base {base.name}")
    except ExtendserveError as e:
        raise BuildError(str(e)) from None
    head_names = [h.name for h in heads]
    if len(set(head_names)) != len(head_names) or set(head_names) & set(BASE_HEAD_NAMES):
        raise BuildError(f"head names must be unique and not 'imagenet' or 'base' (got {head_names}); rename a head file")


def head_file_names(heads: Sequence[Head]) -> list[str]:
    """Where each head lives inside the model folder: ``heads/NAME.pt``, the name made safe for a
    file name (a head's name comes from an untrusted file) and unique."""
    import re

    names: list[str] = []
    for i, h in enumerate(heads):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", h.name).strip("._") or "head"
        name = f"{HEADS_DIR}/{safe}.pt"
        names.append(name if name not in names else f"{HEADS_DIR}/{safe}-{i + 1}.pt")
    return names


def _where(source: str | None) -> str | None:
    """A source as the manifest records it: a file's name, never a path of the machine that built it."""
    return source.replace("\\", "/").rsplit("/", 1)[-1] if source else source


def heads_entries(base: Base, heads: Sequence[Head]) -> list[HeadEntry]:
    """The manifest's ``heads``: the base's own first, then each head with its columns, its file
    inside the model, where it came from, and what it does to the base's world (the share of its
    background it takes)."""
    base_head = "imagenet" if base.backbone is not None else "base"  # the built-ins are ImageNet classifiers
    entries = [HeadEntry(name=base_head, offset=0, count=len(base.labels), source=_where(base.source),
                         digest=base.digest, method="original")]
    offset, world = len(base.labels), background_for(base)
    for h, file in zip(heads, head_file_names(heads)):
        entries.append(HeadEntry(name=h.name, offset=offset, count=len(h.classes), source=_where(h.source), file=file,
                                 digest=h.digest(), method=h.method, classes=list(h.classes),
                                 settings=without_paths({k: v for k, v in h.settings.items()
                                                         if k not in ("trained_on", "checks")}),
                                 checks=h.settings.get("checks"), trained_on=h.settings.get("trained_on"),
                                 background=world.source if world is not None else None,
                                 background_taken=(None if world is None or unfrozen(h)
                                                   else taken_share(base, [h], world.features)),
                                 heldout=h.settings.get("heldout")))
        offset += len(h.classes)
    return entries


def bf16_report(onnx_bytes: bytes, inputs: np.ndarray) -> dict[str, Any]:
    """What serving in bf16 would change, measured on this CPU before the user opts in for good."""
    import tempfile
    from pathlib import Path

    from ..engines import check_inputs, precision_changes
    from ..sessions import make_session

    pixels = np.concatenate([inputs, check_inputs(inputs.shape[1])])
    want = make_session(onnx_bytes, "cpu").run([OUTPUT], {PIXELS: pixels})[0]
    with tempfile.TemporaryDirectory() as tmp:  # OpenVINO reads the model from a file
        (Path(tmp) / "model.onnx").write_bytes(onnx_bytes)
        return precision_changes(Path(tmp) / "model.onnx", pixels, want, "bf16")


def build_model(base: Base, heads: Sequence[Head], real_inputs: Sequence[np.ndarray] = (),
                settings: dict[str, Any] | None = None, cpu_precision: str = "f32",
                min_score: float | None = None) -> BuiltModel:
    """Wire the heads to the base, merge, verify; a model that fails verification is an error.
    ``cpu_precision="bf16"`` lets OpenVINO serve it in bf16; what that changes is measured here."""
    t0 = time.time()
    check_heads(base, heads)
    labels = list(base.labels) + [c for h in heads for c in h.classes]
    entries = heads_entries(base, heads)
    pre = base.preprocess.to_dict()
    wiring = wire(base, heads)
    model = merged_model(base, heads, wiring, metadata(labels, pre, [e.to_dict() for e in entries], base,
                                                       f"extendserve {__version__}"))
    onnx_bytes = model.SerializeToString()
    inputs = verification_inputs(base.input_size, real_inputs)
    check = verify(onnx_bytes, base, heads, wiring, inputs)
    if not check["passed"]:
        import json

        raise BuildError(f"verification failed, nothing was written: {json.dumps(check)}")
    if cpu_precision == "bf16":
        check["bf16"] = bf16_report(onnx_bytes, inputs)
    world = background_for(base)
    if world is not None and heads and not any(unfrozen(h) for h in heads):
        check["background_taken_together"] = {"taken": taken_share(base, list(heads), world.features),
                                              "photos": len(world)}
    manifest = Manifest(
        labels=labels, heads=entries, backbone=base.describe() | {"restored_weights": base.restore_report},
        preprocess=base.preprocess, model_sha256=hashlib.sha256(onnx_bytes).hexdigest(), verification=check,
        input={"name": PIXELS, "dtype": "uint8", "shape": ["batch", base.input_size, base.input_size, 3],
               "layout": "NHWC RGB after resize and centre crop"},
        output={"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(labels)]},
        opset=base.opset, settings=settings or {},
        built={"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 2),
               "extendserve": __version__, "torch": torch.__version__, "python": platform.python_version()},
        cpu_precision=cpu_precision, min_score=min_score,
    )
    return BuiltModel(onnx_bytes, manifest, {e.file: h.to_bytes() for e, h in zip(entries[1:], heads) if e.file})
