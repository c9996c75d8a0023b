"""Pretrained weights: the registry's ImageNet weights loaded into our architecture, a user's
checkpoint restored over them, the digest that names the result, and the ImageNet check.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExtendserveError
from ..files import write_atomic
from .backbone import EfficientNetLite, InputAdapter, build
from .registry import DEFAULT_BACKBONE, BackboneSpec, get_spec


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
    model = build(spec)
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

    from ..config import cache_root
    from ..photos.preprocess import list_images, prepare_file
    from .imagenet import synset_index

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
        write_atomic(cached, json.dumps({"right": right, "photos": len(files)}).encode())
    except OSError:
        pass  # a read-only cache: the figure is recomputed next time
    return right, len(files)
