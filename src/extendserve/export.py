"""Building a model: merge, verify, and publish the model directory atomically."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .base import FEATURES, PIXELS, Base
from .errors import BuildError, ExtendserveError
from .head import Head
from .merge import OUTPUT, SCORES, merged_model, metadata
from .names import check_class_names
from .runtime import make_session
from .scoring import HeadGraph, unfrozen
from .train import taken_share
from .world import background_for

# ONNX vs torch, relative to each photo's largest |logit| (at least 1): onnxruntime picks other
# kernels on other CPU kinds, so an absolute bound on float32 logits is machine luck, not a check.
PARITY_RTOL = 2e-4


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


def _softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def verify(onnx_bytes: bytes, base: Base, heads: Sequence[Head], inputs: np.ndarray) -> dict[str, Any]:
    """The merged model in onnxruntime against: the base alone (its columns, exactly), the
    original torch model for a built-in base (relative), and each head's torch scorer on the
    base's own features (relative); plus the decisions a user sees: the same top-1 and the same
    new-class-or-not answer wherever the reference is not a tie within the tolerance."""
    got, got_scores = make_session(onnx_bytes, "cpu").run([OUTPUT, SCORES], {PIXELS: inputs})
    k = len(base.labels)
    sources = [base.head_input(unfrozen(h)) for h in heads]
    taps = sorted(set(sources) - {FEATURES})
    ref = make_session(base.adapted(["logits", "features", *taps]).SerializeToString(), "cpu").run(
        None, {PIXELS: inputs})
    old = ref[0].astype(np.float32)
    given = dict(zip([FEATURES, *taps], ref[1:]))  # what each head reads, as the base computed it
    with torch.no_grad():
        news = [HeadGraph(h, base.backbone)(torch.from_numpy(given[src]), torch.from_numpy(old)).numpy()
                for h, src in zip(heads, sources)]
    want = np.concatenate([old, *news], axis=1)
    scale = np.maximum(1.0, np.abs(want).max(1))  # per photo: the size of its logits
    base_diff = float(np.abs(got[:, :k] - old).max())
    new_rel = float((np.abs(got[:, k:] - want[:, k:]).max(1) / scale).max()) if heads else 0.0
    top_agree, gate_agree = _decisions_agree(got, want, k, PARITY_RTOL * scale)
    # scores: the graph's softmax of its own (verified) logits, and close to the reference's softmax
    # within what the logits' tolerance allows (a probability moves at most as far as its logits)
    own = _softmax64(got)
    scores_self = float(np.abs(got_scores - own).max())
    scores_ref = float(np.abs(got_scores - _softmax64(want)).max())
    check: dict[str, Any] = {
        "inputs": int(len(inputs)),
        "base_max_abs_diff": base_diff,
        "base_identical": base_diff == 0.0,
        "new_max_abs_diff": float(np.abs(got[:, k:] - want[:, k:]).max()) if heads else 0.0,
        "new_max_rel_diff": new_rel,
        "scores_vs_softmax_of_logits": scores_self,
        "scores_max_abs_diff": scores_ref,
        "top1_agreement": top_agree,
        "new_class_decision_agreement": gate_agree,
        "tolerance": PARITY_RTOL,
        "tolerance_kind": "relative to each photo's largest |logit| (at least 1)",
        "against": "the base graph alone in onnxruntime (base columns), each head's torch scorer on the base's "
                   "features (new columns)",
    }
    ok = got.shape == want.shape and new_rel <= PARITY_RTOL and top_agree == 1.0 and gate_agree == 1.0
    ok = ok and got_scores.shape == got.shape and scores_self <= 1e-5 and scores_ref <= 2 * PARITY_RTOL * float(scale.max())
    ok = ok and base_diff / float(np.abs(old).max() or 1.0) <= PARITY_RTOL
    if base.backbone is not None:  # a built-in base: its export against the original torch model
        from .backbone import InputAdapter

        with torch.no_grad():
            original = base.backbone(InputAdapter(base.preprocess)(torch.from_numpy(inputs))).numpy()
        rel = float((np.abs(got[:, :k] - original).max(1) / scale).max())
        check |= {"imagenet_max_abs_diff": float(np.abs(got[:, :k] - original).max()), "imagenet_max_rel_diff": rel}
        ok = ok and rel <= PARITY_RTOL
    check["passed"] = bool(ok)
    return check


def heads_entries(base: Base, heads: Sequence[Head]) -> list[dict[str, Any]]:
    """The manifest's ``heads``: the base's own first, then each head with its columns, where it
    came from, and what it does to the base's world (the share of its background it takes)."""
    base_head = "imagenet" if base.backbone is not None else "base"  # the built-ins are ImageNet classifiers
    entries = [{"name": base_head, "offset": 0, "count": len(base.labels), "source": base.source,
                "digest": base.digest, "method": "original"}]
    offset, world = len(base.labels), background_for(base)
    for h in heads:
        entries.append({"name": h.name, "offset": offset, "count": len(h.classes), "source": h.source,
                        "digest": h.digest(), "method": h.method, "classes": h.classes, "settings": h.settings,
                        "background": world.source if world is not None else None,
                        "background_taken": (None if world is None or unfrozen(h)
                                             else taken_share(base, h, world.features)),
                        "heldout": h.settings.get("heldout")})
        offset += len(h.classes)
    return entries


def build_model(
    base: Base,
    heads: Sequence[Head],
    out_dir: str | os.PathLike[str],
    real_inputs: Sequence[np.ndarray] = (),
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Wire the heads to the base, verify, and publish ``out_dir``; returns the manifest.

    The directory is written beside its final place and swapped in only once verified, so a
    failed or killed build leaves any previous model untouched.
    """
    t0 = time.time()
    names = [c for h in heads for c in h.classes]
    try:
        check_class_names(names, "the new heads' classes, together", taken=base.labels, taken_by=f"base {base.name}")
    except ExtendserveError as e:
        raise BuildError(str(e)) from None
    head_names = [h.name for h in heads]
    if len(set(head_names)) != len(head_names) or "imagenet" in head_names or "base" in head_names:
        raise BuildError(f"head names must be unique and not 'imagenet' or 'base' (got {head_names}); rename a head file")
    labels = list(base.labels) + names
    heads_meta = heads_entries(base, heads)
    pre = base.preprocess.to_dict()
    model = merged_model(base, heads, metadata(labels, pre, heads_meta, base, f"extendserve {__version__}"))
    onnx_bytes = model.SerializeToString()
    check = verify(onnx_bytes, base, heads, verification_inputs(base.input_size, real_inputs))
    if not check["passed"]:
        raise BuildError(f"verification failed, nothing was written: {json.dumps(check)}")
    manifest = {
        "format": "extendserve-model",
        "version": 1,
        "labels": labels,
        "heads": heads_meta,
        "backbone": base.describe() | {"restored_weights": base.restore_report},
        "preprocess": pre,
        "input": {"name": PIXELS, "dtype": "uint8", "shape": ["batch", base.input_size, base.input_size, 3],
                  "layout": "NHWC RGB after resize and centre crop"},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(labels)]},
        "opset": base.opset,
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
