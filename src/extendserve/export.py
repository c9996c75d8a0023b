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
from .errors import BuildError, ExtendserveError
from .head import Head
from .merge import MergedModel
from .names import check_class_names

OPSET = 17
# ONNX vs torch, relative to each photo's largest |logit| (at least 1): onnxruntime picks other
# kernels on other CPU kinds, so an absolute bound on float32 logits is machine luck, not a check.
PARITY_RTOL = 2e-4


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


def _decisions_agree(got: np.ndarray, want: np.ndarray, split: int, tol: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, new-class-wins agreement) over the rows where the reference is not a tie
    within ``tol``: there float rounding, not the model, picks the winner."""
    top2 = np.sort(want, axis=1)[:, -2:] if want.shape[1] > 1 else np.zeros((len(want), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    top = float((got.argmax(1) == want.argmax(1))[clear].mean()) if clear.any() else 1.0
    if want.shape[1] == split:
        return top, 1.0
    margin = want[:, split:].max(1) - want[:, :split].max(1)
    clear = np.abs(margin) > 2 * tol
    wins = (got[:, split:].max(1) > got[:, :split].max(1)) == (margin > 0)
    return top, float(wins[clear].mean()) if clear.any() else 1.0


def verify(
    onnx_bytes: bytes, merged: MergedModel, backbone: LoadedBackbone, inputs: np.ndarray
) -> dict[str, Any]:
    """onnxruntime vs torch on the same pixels, compared relative to the logits' magnitude (kernels
    differ in the last bits from one CPU kind to the next), plus the decisions a user sees: the
    same top-1 and the same new-class-or-not answer wherever the reference is not a tie."""
    from .runtime import make_session

    sess = make_session(onnx_bytes, "cpu")
    got = sess.run(["logits"], {"pixels": inputs})[0]
    x = torch.from_numpy(inputs)
    with torch.no_grad():
        want_all = merged(x).numpy()
        original = backbone.model(merged.features.adapter(x)).numpy()
    split = original.shape[1]
    scale = np.maximum(1.0, np.abs(want_all).max(1))  # per photo: the size of its logits
    tol = PARITY_RTOL * scale
    imagenet_rel = float((np.abs(got[:, :split] - original).max(1) / scale).max())
    new_rel = float((np.abs(got[:, split:] - want_all[:, split:]).max(1) / scale).max()) if got.shape[1] > split else 0.0
    top_agree, gate_agree = _decisions_agree(got, want_all, split, tol)
    ok = (got.shape == want_all.shape and imagenet_rel <= PARITY_RTOL and new_rel <= PARITY_RTOL
          and top_agree == 1.0 and gate_agree == 1.0)
    return {
        "passed": bool(ok),
        "inputs": int(len(inputs)),
        "imagenet_max_abs_diff": float(np.abs(got[:, :split] - original).max()),
        "new_max_abs_diff": float(np.abs(got[:, split:] - want_all[:, split:]).max()) if got.shape[1] > split else 0.0,
        "imagenet_max_rel_diff": imagenet_rel,
        "new_max_rel_diff": new_rel,
        "top1_agreement": top_agree,
        "new_class_decision_agreement": gate_agree,
        "tolerance": PARITY_RTOL,
        "tolerance_kind": "relative to each photo's largest |logit| (at least 1)",
        "against": "original torch model (base columns), merged torch module (new columns)",
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
    try:
        check_class_names(names, "the new heads' classes, together", taken=spec.labels,
                          taken_by=f"backbone {spec.name}")
    except ExtendserveError as e:
        raise BuildError(str(e)) from None
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


MODEL_FILES = ("model.onnx", "manifest.json")


def output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Where a build may write: ``out_dir`` (a symlink followed to its target) when it is absent,
    empty, or an extendserve model directory holding nothing else. Anything else is refused with
    the fix, before any work is done and without touching it: a build replaces the whole folder."""
    given = Path(out_dir)
    final = Path(os.path.realpath(given))  # follows every link, as the user meant the folder it names
    if not final.exists():
        if final.parent.exists() and not final.parent.is_dir():
            raise BuildError(f"-o {given}: {final.parent} is not a folder")
        return final
    if not final.is_dir():
        raise BuildError(f"-o {given}: {final} is a file, not a model folder; choose another -o")
    entries = sorted(p.name for p in final.iterdir())
    if not entries:
        return final
    if "manifest.json" not in entries or not _is_model_manifest(final / "manifest.json"):
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise BuildError(f"-o {given}: {final} is not empty and not an extendserve model folder (it holds {shown}); "
                         "a build replaces the whole folder, so it writes only into a new or empty folder or an "
                         f"existing model. Give a new folder, for example -o {given / 'my-model'}")
    others = [e for e in entries if e not in MODEL_FILES]
    if others:
        raise BuildError(f"-o {given}: the model folder {final} also holds {', '.join(others[:5])}, which a build "
                         "would delete; move them out of it, or choose another -o")
    return final


def _is_model_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text("utf-8")).get("format") == "extendserve-model"
    except (OSError, ValueError, AttributeError):
        return False


def publish(out_dir: str | os.PathLike[str], files: dict[str, bytes]) -> Path:
    """Write ``files`` into a fresh directory and swap it in for ``out_dir`` in one step;
    returns the folder written (a symlinked ``out_dir`` stays a link, to the new model)."""
    final = output_dir(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
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
    return final


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
