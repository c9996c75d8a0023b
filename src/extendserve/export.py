"""Export to ONNX, verify against torch, and publish a model directory atomically."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from . import __version__
from .backbone import LoadedBackbone
from .errors import BuildError
from .head import Head
from .merge import MergedModel

OPSET = 17
PARITY_TOL = 1e-4  # ImageNet logits, ONNX vs the original torch model


def export_onnx(module: nn.Module, size: int, output: str, metadata: dict[str, str] | None = None) -> bytes:
    """uint8 [batch, size, size, 3] -> ``output``, with a dynamic batch; returns the model bytes."""
    module.eval()
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (example,),
            buf,
            input_names=["pixels"],
            output_names=[output],
            dynamic_axes={"pixels": {0: "batch"}, output: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def verification_inputs(size: int, real: Sequence[np.ndarray] = (), seed: int = 0) -> np.ndarray:
    """Random noise, smooth synthetic scenes, and any real photos given."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    smooth = np.stack(
        [np.stack([np.sin(6 * xx + p) * 120 + 128, yy * 255, (xx * yy) * 255], -1) for p in (0, 2)]
    ).clip(0, 255).astype(np.uint8)
    parts = [noise, smooth] + ([np.stack(real)] if len(real) else [])
    return np.concatenate(parts)


def verify(
    onnx_bytes: bytes, merged: MergedModel, backbone: LoadedBackbone, inputs: np.ndarray
) -> dict[str, Any]:
    """onnxruntime vs torch on the same pixels; the ImageNet columns vs the *original* model."""
    from .runtime import make_session

    sess = make_session(onnx_bytes, "cpu")
    got = sess.run(["logits"], {"pixels": inputs})[0]
    x = torch.from_numpy(inputs)
    with torch.no_grad():
        want_all = merged(x).numpy()
        original = backbone.model(merged.features.adapter(x)).numpy()
    imagenet_diff = float(np.abs(got[:, :1000] - original).max())
    new_diff = float(np.abs(got[:, 1000:] - want_all[:, 1000:]).max()) if got.shape[1] > 1000 else 0.0
    top_agree = float((got.argmax(1) == want_all.argmax(1)).mean())
    ok = imagenet_diff <= PARITY_TOL and new_diff <= 1e-3 and got.shape == want_all.shape
    return {
        "passed": bool(ok),
        "inputs": int(len(inputs)),
        "imagenet_max_abs_diff": imagenet_diff,
        "new_max_abs_diff": new_diff,
        "top1_agreement": top_agree,
        "tolerance": PARITY_TOL,
        "against": "original torch model (columns 0..999), merged torch module (new columns)",
    }


def build_model(
    backbone: LoadedBackbone,
    heads: Sequence[Head],
    out_dir: str | os.PathLike[str],
    real_inputs: Sequence[np.ndarray] = (),
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge, export, verify and publish ``out_dir``; returns the manifest.

    The directory is written beside its final place and swapped in only once verified, so a
    failed or killed build leaves any previous model untouched.
    """
    t0 = time.time()
    spec = backbone.spec
    names = [c for h in heads for c in h.classes]
    clash = sorted({c for c in names if names.count(c) > 1})
    if clash:
        raise BuildError(f"class names {clash} appear in more than one head; rename them in one head")
    head_names = [h.name for h in heads]
    if len(set(head_names)) != len(head_names) or "imagenet" in head_names:
        raise BuildError(f"head names must be unique and not 'imagenet' (got {head_names}); rename a head file")

    merged = MergedModel(backbone, heads).eval()
    labels = list(spec.labels) + names
    heads_meta = [{"name": "imagenet", "offset": 0, "count": len(spec.labels), "source": spec.weights_package,
                   "digest": backbone.digest, "method": "original"}]
    offset = len(spec.labels)
    for h in heads:
        heads_meta.append({"name": h.name, "offset": offset, "count": len(h.classes), "source": h.source,
                           "digest": h.digest(), "method": h.method, "classes": h.classes,
                           "settings": h.settings})
        offset += len(h.classes)
    pre = spec.preprocess.to_dict()
    onnx_bytes = export_onnx(
        merged, spec.input_size, "logits",
        {"labels": json.dumps(labels), "preprocess": json.dumps(pre),
         "heads": json.dumps([{k: m[k] for k in ("name", "offset", "count")} for m in heads_meta]),
         "backbone": spec.name, "producer": f"extendserve {__version__}"},
    )
    check = verify(onnx_bytes, merged, backbone, verification_inputs(spec.input_size, real_inputs))
    if not check["passed"]:
        raise BuildError(f"verification failed, nothing was written: {json.dumps(check)}")
    manifest = {
        "format": "extendserve-model",
        "version": 1,
        "labels": labels,
        "heads": heads_meta,
        "backbone": {"name": spec.name, "digest": backbone.digest, "weights_package": spec.weights_package,
                     "feature_dim": spec.feature_dim, "classifier": list(spec.classifier),
                     "restored_weights": backbone.restore_report},
        "preprocess": pre,
        "input": {"name": "pixels", "dtype": "uint8", "shape": ["batch", spec.input_size, spec.input_size, 3],
                  "layout": "NHWC RGB after resize and centre crop"},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", len(labels)]},
        "opset": OPSET,
        "verification": check,
        "model_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "settings": settings or {},
        "built": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 2),
                  "extendserve": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    publish(out_dir, {"model.onnx": onnx_bytes, "manifest.json": json.dumps(manifest, indent=2).encode()})
    return manifest


def publish(out_dir: str | os.PathLike[str], files: dict[str, bytes]) -> None:
    """Write ``files`` into a fresh directory and swap it in for ``out_dir`` in one step."""
    final = Path(out_dir).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise BuildError(f"{final} exists and is not a directory; choose another -o")
    _remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-{os.getpid()}-", dir=final.parent))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        if final.exists():
            _exchange(tmp, final)  # tmp now holds the old model
        else:
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(final: Path) -> None:
    """Drop what killed builds left beside ``final`` (their process is gone); never ``final``."""
    for p in final.parent.glob(f".{final.name}.building-*"):
        try:
            pid = int(p.name.split("building-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # that build is still running
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE), else a close second."""
    libc_name = ctypes.util.find_library("c")
    if platform.system() == "Linux" and libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if hasattr(libc, "renameat2"):
            AT_FDCWD, RENAME_EXCHANGE = -100, 2
            if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
                return
    old = b.with_name(f".{b.name}.old-{os.getpid()}")
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)
