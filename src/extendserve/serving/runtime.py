"""Running a built model: its checked files, the engine that runs it (onnxruntime on CUDA or the
CPU, or OpenVINO), predictions. No torch here. Sessions are made in :mod:`extendserve.sessions`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..building.manifest import Manifest, read_model_dir
from ..config import PreprocessConfig
from ..engines import Engine, OrtEngine, choose
from ..errors import BadImageError, ExtendserveError
from ..photos.preprocess import prepare, prepare_file
from ..sessions import active_device, make_session

log = logging.getLogger("extendserve")

UNKNOWN = "unknown"  # the first answer where the best score is under min_score


@dataclass(frozen=True)
class Prediction:
    """One of a photo's top classes: its label, its column in the model's output (the base's
    classes first, then each head's), its probability over all classes (the graph's ``scores``
    output) and the head it belongs to ('imagenet' or 'base': the original classes). The service
    returns it as it is, and ``predict`` prints it."""

    label: str
    index: int
    score: float
    head: str

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "score": self.score, "head": self.head}


def check_metadata(sess: ort.InferenceSession, manifest: Manifest, where: Path) -> None:
    """The manifest's labels and preprocessing must be the copies ``model.onnx`` carries (its sha256,
    which the manifest records, covers those): a manifest edited to rename classes or change the
    preprocessing is refused, not served."""
    import json

    meta = sess.get_modelmeta().custom_metadata_map
    try:
        labels = json.loads(meta["labels"]) if "labels" in meta else None
        pre = PreprocessConfig.from_dict(json.loads(meta["preprocess"])) if "preprocess" in meta else None
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ExtendserveError(f"{where}: model.onnx's own labels or preprocessing are unreadable; rebuild the model") from None
    if labels is not None and [str(x) for x in labels] != list(manifest.labels):
        raise ExtendserveError(f"{where}: manifest.json's labels are not the ones inside model.onnx (the manifest was "
                               "changed after the build); restore it or rebuild the model")
    if pre is not None and pre != manifest.preprocess:
        raise ExtendserveError(f"{where}: manifest.json's preprocessing is not the one inside model.onnx (the manifest "
                               "was changed after the build); restore it or rebuild the model")


class Model:
    """A built model directory: ``model.onnx`` plus ``manifest.json``, checked against each other
    when loaded (sha256, label count = output width), so a mismatched pair fails at start-up."""

    def __init__(self, directory: str | os.PathLike[str], device: str = "cpu", threads: int | None = None,
                 engine: str = "onnxruntime", decided: dict[str, Any] | None = None, workers: int = 1):
        """``engine``: on the CPU, ``auto`` picks OpenVINO where it measures faster with the same
        decisions (see :mod:`engines`), ``onnxruntime`` or ``openvino`` force one; ``decided``: the
        report of a choice already made for this model on this machine, taken as it is."""
        self.dir = Path(directory)
        self.manifest, data = read_model_dir(self.dir)
        self.labels: list[str] = list(self.manifest.labels)
        self.preprocess = self.manifest.preprocess
        self.head_of = np.empty(len(self.labels), dtype=object)
        for h in self.manifest.heads:
            self.head_of[h.offset : h.offset + h.count] = h.name
        self.session = make_session(data, device, threads)
        self.input_name = self.session.get_inputs()[0].name
        width = self.session.get_outputs()[0].shape[-1]
        if width != len(self.labels):
            raise ExtendserveError(f"{self.dir}: model.onnx gives {width} outputs but the manifest has "
                                   f"{len(self.labels)} labels; rebuild the model")
        check_metadata(self.session, self.manifest, self.dir)
        self.device = active_device(self.session)
        # models built before the scores output: the same softmax, in numpy
        self.has_scores = "scores" in [o.name for o in self.session.get_outputs()]
        self.engine: Engine = OrtEngine(self.session, self.input_name)
        self.engine_report: dict[str, Any] = {"engine": "onnxruntime", "why": "CUDA: onnxruntime-gpu"}
        if self.device == "cpu":
            self.engine, self.engine_report = choose(self.engine, self.dir / "model.onnx", self.preprocess.crop,
                                                     engine, threads, self.manifest.cpu_precision, decided, workers)

    @property
    def providers(self) -> list[str]:
        """What really runs the model: onnxruntime's providers, or OpenVINO's CPU plugin."""
        if self.engine.name == "openvino":
            return ["OpenVINO CPU"]
        return list(self.session.get_providers())

    def warm_up(self, batches: Sequence[int] = (1, 8)) -> None:
        """Run the shapes serving will see once, so the first real request pays no set-up
        (on CUDA: cuDNN algorithm choice and memory arena growth). The service calls it; one-shot
        commands such as ``predict`` do not need it."""
        c = self.preprocess.crop
        for b in batches:
            self.probabilities(np.zeros((b, c, c, 3), np.uint8))

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, crop, crop, 3] -> scores [B, K + N]: the graph's own softmax over all outputs
        (one probability model for old and new classes, see extendserve.heads.calibrated)."""
        if self.has_scores:
            return self.run(pixels, "scores")
        return softmax(self.run(pixels))

    def run(self, pixels: np.ndarray, output: str = "logits") -> np.ndarray:
        """uint8 [B, crop, crop, 3] -> ``output`` [B, K + N]: logits (K: the base's own classes,
        exactly the base's) or scores."""
        if self.device == "cuda":
            # IO binding: the uint8 batch (4x smaller than floats) is copied to the GPU once and
            # the logits come back once, with no intermediate host copies. Unverified: no GPU was
            # available when this was written.
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, np.ascontiguousarray(pixels))
            binding.bind_output(output)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return self.engine.run([output], pixels)[0]

    def check_top_k(self, k: int) -> int:
        """The one check of how many predictions a photo gets."""
        if not 1 <= k <= len(self.labels):
            raise ExtendserveError(f"top_k must be between 1 and {len(self.labels)} (the model's classes), not {k}")
        return k

    def classify(self, pixels: np.ndarray, k: int = 5, min_score: float | None = None) -> list[list[Prediction]]:
        """uint8 [B, crop, crop, 3] -> each photo's top ``k`` predictions, best first."""
        return self.top_k(self.logits(pixels, scores=True), self.check_top_k(k), min_score)

    def top_k(self, probs: np.ndarray, k: int, min_score: float | None = None) -> list[list[Prediction]]:
        """Probability rows -> their top ``k`` (checked by :meth:`check_top_k`), best first; where the
        best is under ``min_score`` (default the model's, ``build --min-score``), an explicit
        ``unknown`` comes first, one of the ``k`` (index -1, head 'none', score 1 - the best score: the
        chance, the scores being calibrated, that the best class is wrong), the best k - 1 following."""
        floor = self.manifest.min_score if min_score is None else min_score
        if floor is not None and not 0 <= floor <= 1:
            raise ExtendserveError(f"min_score must be from 0 to 1, not {floor}")
        idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out = []
        for row, p in zip(idx, probs):
            preds = [Prediction(self.labels[i], int(i), float(p[i]), str(self.head_of[i])) for i in row]
            if floor is not None and preds[0].score < floor:
                preds = [Prediction(UNKNOWN, -1, 1.0 - preds[0].score, "none"), *preds[: k - 1]]
            out.append(preds)
        return out

    def prepare(self, data: bytes, source: str = "image") -> np.ndarray:
        return prepare(data, self.preprocess, source)

    def logits(self, pixels: np.ndarray, batch: int = 32, scores: bool = False) -> np.ndarray:
        """Any number of photos, run ``batch`` at a time (``scores``: probabilities, not logits)."""
        if not len(pixels):
            return np.zeros((0, len(self.labels)), np.float32)
        step = self.probabilities if scores else self.run
        return np.concatenate([step(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])

    def load_files(self, paths: Sequence[str | os.PathLike[str]]) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """The readable photos' pixels, their positions in ``paths``, and why the others failed."""
        arrays: list[np.ndarray] = []
        ok: list[int] = []
        errors: dict[int, str] = {}
        for i, p in enumerate(paths):
            try:
                arrays.append(prepare_file(p, self.preprocess))
                ok.append(i)
            except BadImageError as e:
                errors[i] = str(e)
        c = self.preprocess.crop
        return (np.stack(arrays) if arrays else np.zeros((0, c, c, 3), np.uint8)), ok, errors

    def predict(self, images: Sequence[Any], k: int = 5, min_score: float | None = None) -> list[list[Prediction]]:
        """PIL images, H x W x 3 uint8 RGB arrays, photo bytes or paths -> each one's top ``k``,
        best first; preprocessed as the model's manifest says (the Python API, for notebooks)."""
        from ..photos.preprocess import prepare_image

        if not len(images):
            return []
        return self.classify(np.stack([prepare_image(x, self.preprocess) for x in images]), k, min_score)

    def predict_files(self, paths: Sequence[str], k: int = 5, min_score: float | None = None) -> list[dict[str, Any]]:
        """One result per path, in order; an unreadable photo gets an ``error`` entry."""
        self.check_top_k(k)
        results: list[dict[str, Any]] = [{"image": p} for p in paths]
        pixels, ok, errors = self.load_files(paths)
        for i, msg in errors.items():
            results[i]["error"] = msg
        for i, row in zip(ok, self.classify(pixels, k, min_score)):
            results[i]["predictions"] = [x.to_dict() for x in row]
        return results


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z, dtype=np.float64)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

