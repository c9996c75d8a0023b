"""Held-out photos that are near-copies of training photos: the same shot shifted, mirrored,
cropped, re-lit or re-encoded makes a held-out figure optimistic without a word (exact copies are
found by content, :func:`evaluate.training_photos`). Judged by train-head's own near-copy test
(:func:`heads.checks.near_copy_scores`: the centre and whole photo against the centre, whole and
mirrored views), at the limit train-head takes from the training folder (above what photos of its
different classes reach). The features come from the built model itself (its base's feature
tensor exposed as an output), so no torch is needed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..config import FEATURES
from ..errors import ExtendserveError
from ..heads.checks import COPY_VIEWS, copy_threshold, near_copy_scores
from ..photos.preprocess import list_images, read_photo
from ..photos.views import photo_views
from ..progress import eta, progress
from ..serving.runtime import Model

BATCH = 8  # photos (of 4 views each) through the model at once


class CopyFinder:
    """Features of a photo's COPY_VIEWS from the built model (its base's feature tensor)."""

    def __init__(self, model: Model):
        import onnxruntime as ort

        from ..building.manifest import read_model_dir

        graph = onnx.load_from_string(read_model_dir(model.dir)[1])  # the bytes checked against the manifest
        graph.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
        self.session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.preprocess = model.preprocess

    def features(self, files: list[Path], label: str) -> tuple[np.ndarray, list[int]]:
        """[n, len(VIEWS), D] with only COPY_VIEWS filled (what near_copy_scores reads), readable files' places."""
        out: list[np.ndarray] = []
        ok: list[int] = []
        t0 = time.monotonic()
        for i in range(0, len(files), BATCH):
            views = []
            for j in range(i, min(i + BATCH, len(files))):
                try:
                    views.append(photo_views(read_photo(files[j]), str(files[j]), self.preprocess)[list(COPY_VIEWS)])
                    ok.append(j)
                except ExtendserveError:  # unreadable photos are reported by the evaluation itself
                    continue
            if views:
                got = self.session.run([FEATURES], {self.input: np.concatenate(views)})[0]
                full = np.zeros((len(views), max(COPY_VIEWS) + 1, got.shape[-1]), np.float32)
                full[:, list(COPY_VIEWS)] = got.reshape(len(views), len(COPY_VIEWS), -1)
                out.append(full)
            progress(label, min(i + BATCH, len(files)), len(files), eta(t0, min(i + BATCH, len(files)), len(files)))
        return (np.concatenate(out) if out else np.zeros((0, max(COPY_VIEWS) + 1, 1), np.float32)), ok


def near_copies(model: Model, held: list[dict[str, Any]], train: str) -> dict[str, Any]:
    """Which of the held-out photos ``held`` (evaluate's per-photo records) are near-copies of a
    photo in the training folder ``train`` (one folder a class), and the figures without them."""
    root = Path(train)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    files, labels = [], []
    for c, d in enumerate(classes):
        found = list_images(d)
        files += found
        labels += [c] * len(found)
    if not files:
        raise ExtendserveError(f"--train {train}: no class folders with photos; give the folder the heads were trained on")
    finder = CopyFinder(model)
    tf, tok = finder.features(files, "training photos")
    hf, hok = finder.features([Path(x["path"]) for x in held], "held-out photos")
    tl = np.array([labels[i] for i in tok])
    limit = copy_threshold(np.maximum(s := near_copy_scores(tf, tf), s.T), tl) if len(tf) > 1 else 0.98
    scores = np.maximum(near_copy_scores(hf, tf), near_copy_scores(tf, hf).T)
    flagged = {hok[r]: int(scores[r].argmax()) for r in np.flatnonzero(scores.max(1) >= limit)} if len(tf) else {}
    per: dict[str, Any] = {}
    for i, x in enumerate(held):
        p = per.setdefault(x["true"], {"photos": 0, "correct": 0, "near_copies": 0, "correct_without": 0,
                                       "examples": []})
        right = x["predicted"] == x["true"]
        p["photos"] += 1
        p["correct"] += right
        if i in flagged:
            p["near_copies"] += 1
            if len(p["examples"]) < 3:
                p["examples"].append({"held_out": x["path"], "training": str(files[tok[flagged[i]]]),
                                      "likeness": round(float(scores[hok.index(i)].max()), 3)})
        else:
            p["correct_without"] += right
    for p in per.values():
        rest = p["photos"] - p["near_copies"]
        p["accuracy"], p["accuracy_without"] = p["correct"] / p["photos"], (p["correct_without"] / rest if rest else None)
    total, copies = len(held), len(flagged)
    right_without = sum(p["correct_without"] for p in per.values())
    return {"training_folder": str(root), "limit": round(limit, 3), "near_copies": copies, "per_class": per,
            "accuracy_without": right_without / (total - copies) if total > copies else None,
            "photos_without": total - copies}
