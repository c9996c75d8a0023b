"""Verifying a merged model before anything is written: its ONNX graph in onnxruntime against the
base alone and each head's torch scorer, on noise, smooth scenes and real photos, compared relative
to each photo's logits and by the decisions a user sees (the same on any CPU kind)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..bases.base import PIXELS, Base
from ..heads.head import Head
from ..heads.scoring import HeadGraph, TorchMerged
from ..sessions import make_session
from .merge import OUTPUT, SCORES, Wiring

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


def verify(onnx_bytes: bytes, base: Base, heads: Sequence[Head], wiring: Wiring, inputs: np.ndarray) -> dict[str, Any]:
    """The merged model in onnxruntime against: the base alone (its columns, exactly), the
    original torch model for a built-in base (relative), and each head's torch scorer on the
    base's own features (relative); plus the decisions a user sees: the same top-1 and the same
    new-class-or-not answer wherever the reference is not a tie within the tolerance."""
    got, got_scores = make_session(onnx_bytes, "cpu").run([OUTPUT, SCORES], {PIXELS: inputs})
    k = len(base.labels)
    ref = make_session(wiring.adapted.SerializeToString(), "cpu").run(None, {PIXELS: inputs})
    old = ref[0].astype(np.float32)
    given = dict(zip(wiring.reference_outputs, ref[1:]))  # what each head reads, as the base computed it
    with torch.no_grad():
        news = [HeadGraph(h, base.backbone)(torch.from_numpy(given[src]), torch.from_numpy(old)).numpy()
                for h, src in zip(heads, wiring.sources)]
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
        with torch.no_grad():
            original = TorchMerged(base.backbone, base.preprocess)(torch.from_numpy(inputs)).numpy()
        rel = float((np.abs(got[:, :k] - original).max(1) / scale).max())
        check |= {"imagenet_max_abs_diff": float(np.abs(got[:, :k] - original).max()), "imagenet_max_rel_diff": rel}
        ok = ok and rel <= PARITY_RTOL
    check["passed"] = bool(ok)
    return check
