"""What an ONNX classifier file says of itself, checked: its preprocessing (``--preprocess``, its
metadata, or torchvision's values said aloud), its labels, and whether every byte it uses is in
the file. A wrong guess here costs accuracy without any error, so each fallback is said in one line."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..config import UNIT_SCALE, PreprocessConfig
from ..errors import ExtendserveError
from ..names import read_names

TORCHVISION = {"resize": 256, "crop": 224, "interpolation": "bilinear",
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # 0-1 units, as torchvision writes


_PASS_THROUGH = {"Identity", "Dropout"}


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in graph.node for out in n.output}


def _consts(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def find_classifier(model: onnx.ModelProto, where: str = "the model") -> tuple[str, bool, str, np.ndarray, np.ndarray]:
    """(features tensor, features are [B, D, 1, 1], logits tensor, weight [K, D], bias [K])."""
    graph = model.graph
    prod, consts = _producers(graph), _consts(graph)
    if len(graph.output) < 1:
        raise ExtendserveError(f"{where}: the graph has no output")
    logits = graph.output[0].name
    node = prod.get(logits)
    while node is not None and node.op_type in _PASS_THROUGH | {"Softmax", "LogSoftmax"}:
        logits = node.input[0]
        node = prod.get(logits)
    if node is None:
        raise ExtendserveError(f"{where}: the output {graph.output[0].name!r} is not computed by any node")
    seen = node.op_type

    def attr(n: onnx.NodeProto, name: str, default: Any) -> Any:
        return next((helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)

    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in consts:
        w = consts[node.input[1]].astype(np.float32)
        if attr(node, "transA", 0):
            raise ExtendserveError(f"{where}: its final Gemm transposes its input (transA); not a plain classifier")
        w = w if attr(node, "transB", 0) else w.T
        b = consts.get(node.input[2]) if len(node.input) > 2 else None
        b = np.zeros(w.shape[0], np.float32) if b is None else np.broadcast_to(b.astype(np.float32), (w.shape[0],)).copy()
        return node.input[0], False, logits, w * float(attr(node, "alpha", 1.0)), b * float(attr(node, "beta", 1.0))
    if node.op_type == "Add":
        mm_in, b_in = (node.input[0], node.input[1]) if node.input[1] in consts else (node.input[1], node.input[0])
        mm = prod.get(mm_in)
        if mm is not None and mm.op_type == "MatMul" and b_in in consts and mm.input[1] in consts:
            w = consts[mm.input[1]].astype(np.float32).T
            return mm.input[0], False, logits, w, np.broadcast_to(consts[b_in].astype(np.float32), (w.shape[0],)).copy()
        seen = f"Add of {mm.op_type if mm is not None else 'an input'}"
    if node.op_type in ("Flatten", "Reshape", "Squeeze"):
        conv = prod.get(node.input[0])
        if conv is not None and conv.op_type == "Conv" and conv.input[1] in consts:
            k = consts[conv.input[1]]
            if k.ndim == 4 and k.shape[2:] == (1, 1) and attr(conv, "group", 1) == 1:
                w = k[:, :, 0, 0].astype(np.float32)
                b = consts[conv.input[2]].astype(np.float32) if len(conv.input) > 2 else np.zeros(w.shape[0], np.float32)
                return conv.input[0], True, logits, w, b
        seen = f"{node.op_type} of {conv.op_type if conv is not None else 'an input'}"
    raise ExtendserveError(
        f"{where}: no final linear classifier found. Looked at what computes the output "
        f"{graph.output[0].name!r} (through Softmax, Identity, Dropout) for a Gemm, a MatMul + Add, or a 1x1 "
        f"Conv + Flatten/Reshape/Squeeze, with constant weights; found {seen}. Export the classifier with its "
        "final layer (for example torch.nn.Linear) as the graph's output"
    )


def input_of(model: onnx.ModelProto, where: str) -> tuple[str, str, int, int | None]:
    """(name, layout, element type, spatial size if static) of the image input."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ExtendserveError(f"{where}: expected one image input, found {[i.name for i in inputs]}")
    i = inputs[0]
    t = i.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if len(dims) != 4:
        raise ExtendserveError(f"{where}: the input {i.name!r} has {len(dims)} dimensions; expected an image batch "
                               "[batch, 3, H, W] or [batch, H, W, 3]")
    if t.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
        raise ExtendserveError(f"{where}: the input {i.name!r} is {TensorProto.DataType.Name(t.elem_type)}; "
                               "extendserve feeds normalised floats")
    if dims[1] == 3:
        return i.name, "NCHW", t.elem_type, dims[2]
    if dims[3] == 3:
        return i.name, "NHWC", t.elem_type, dims[1]
    raise ExtendserveError(f"{where}: cannot tell the channel axis of input {i.name!r} {dims}; expected 3 channels "
                           "at axis 1 (NCHW) or axis 3 (NHWC)")


def preprocess_from_file(path: str | os.PathLike[str] | None, size: int | None) -> PreprocessConfig:
    """``--preprocess FILE.json`` (torchvision's 0-1 units) -> our config (0-255 units)."""
    given = None
    if path is not None:
        try:
            given = json.loads(Path(path).read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise ExtendserveError(f"--preprocess {path}: not a readable JSON file ({e})") from None
    return preprocess_config(given, size, f"--preprocess {path}")


def preprocess_config(given: Any, size: int | None, where: str) -> PreprocessConfig:
    """Keys ``resize``, ``crop``, ``interpolation``, ``mean``, ``std`` (torchvision's ImageNet values
    for those absent) and ``units``: ``0-1`` (torchvision's, the default) or ``0-255`` (pixel values,
    as a built model's manifest writes them, so its block can be pasted) -> our config, checked."""
    d = dict(TORCHVISION)
    if size:
        d["crop"], d["resize"] = size, round(size * 256 / 224)
    if given is not None:
        unknown = set(given) - {*TORCHVISION, "units"} if isinstance(given, dict) else {"(not an object)"}
        if unknown:
            raise ExtendserveError(f"{where}: expected keys {sorted(TORCHVISION)} and units, found {sorted(unknown)}")
        d |= given
    units = d.pop("units", "0-1")
    if units not in UNIT_SCALE:
        raise ExtendserveError(f"{where}: units must be \"0-1\" (torchvision's mean and std) or \"0-255\" (pixel values)")
    try:
        scale = UNIT_SCALE[units]
        mean = [float(v) * scale for v in d["mean"]]
        std = [float(v) * scale for v in d["std"]]
        cfg = PreprocessConfig(resize=int(d["resize"]), crop=int(d["crop"]), interpolation=str(d["interpolation"]),
                               mean=tuple(mean), std=tuple(std))  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ExtendserveError(f"{where}: bad value ({e})") from None
    if not all(math.isfinite(v) for v in (*mean, *std)):
        raise ExtendserveError(f"{where}: mean and std must be finite numbers, not NaN or Infinity "
                               f"(mean {d['mean']}, std {d['std']})")
    if given is not None and "units" not in given and max(map(abs, mean)) > 2 * 255:
        raise ExtendserveError(f"{where}: mean {d['mean']} looks like pixel values (0-255), but without \"units\" "
                               "they are read as torchvision's 0-1 values; add \"units\": \"0-255\" or divide them by 255")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or not 0 < cfg.crop <= cfg.resize * 2:
        raise ExtendserveError(f"{where}: mean and std need 3 values each (std > 0), crop and resize "
                               "positive sizes")
    if cfg.interpolation not in ("bilinear", "bicubic"):
        raise ExtendserveError(f"{where}: interpolation must be bilinear or bicubic")
    if size and cfg.crop != size:
        raise ExtendserveError(f"{where}: crop {cfg.crop}, but the model's input is {size}x{size}")
    return cfg


def preprocess_of(model: onnx.ModelProto, path: Any, size: int | None, where: str) -> PreprocessConfig:
    """``--preprocess``, else the file's own ``preprocess`` metadata, else torchvision's ImageNet
    values, said in one line: a wrong guess costs accuracy without any error."""
    if path is not None:
        return preprocess_from_file(path, size)
    meta = {p.key: p.value for p in model.metadata_props}
    if "preprocess" in meta:
        try:
            given = json.loads(meta["preprocess"])
        except ValueError as e:
            raise ExtendserveError(f"{where}: its 'preprocess' metadata is not JSON ({e}); give --preprocess FILE.json") from None
        return preprocess_config(given, size, f"{where} (its 'preprocess' metadata)")
    cfg = preprocess_config(None, size, where)
    print(f"WARNING: {where} names no preprocessing (no --preprocess, no 'preprocess' metadata): assuming resize "
          f"{cfg.resize}, centre crop {cfg.crop}, {cfg.interpolation}, torchvision's ImageNet mean and std; if the "
          "model was trained otherwise, give --preprocess FILE.json", file=sys.stderr)
    return cfg


def labels_of(path: str | os.PathLike[str] | None, model: onnx.ModelProto, k: int, where: str) -> list[str]:
    if path is not None:
        labels = read_names(path, "label list")
        source = f"--labels {path}"
    else:
        meta = {p.key: p.value for p in model.metadata_props}
        try:
            labels = [str(x) for x in json.loads(meta["labels"])] if "labels" in meta else []
        except ValueError:
            labels = []
        source = f"{where} (its 'labels' metadata)"
        if not labels:
            print(f"WARNING: {where} names no labels (no --labels, no 'labels' metadata): its classes are served "
                  f"as class_0 .. class_{k - 1}; give --labels FILE (one name a line)", file=sys.stderr)
            labels = [f"class_{i}" for i in range(k)]
    if len(labels) != k:
        raise ExtendserveError(f"{source}: {len(labels)} labels for a classifier of {k} classes; give one a line")
    if any(not n.strip() for n in labels):
        raise ExtendserveError(f"{source}: empty labels; give one name a line")
    return labels


STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def self_contained(model: onnx.ModelProto, where: str) -> None:
    """Refuse what would make a merged model depend on more than its own bytes, or fail later with
    onnxruntime's text: tensors kept in external files (read from wherever the process runs, and
    outside the sha256 that names the model), custom-op domains, a graph the checker refuses."""
    external = [t.name or "(unnamed)" for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExtendserveError(
            f"{where}: {len(external)} tensor(s) (first {external[0]!r}) keep their data in external files; give a "
            "self-contained file: python -c \"import onnx; onnx.save(onnx.load('IN.onnx'), 'OUT.onnx')\" "
            "(models over 2 GB cannot be extended)")
    custom = sorted({o.domain for o in model.opset_import if o.domain not in STANDARD_DOMAINS})
    if custom:
        raise ExtendserveError(f"{where}: uses operators of custom domain(s) {custom}, which onnxruntime runs only "
                               "with their own library; export the classifier with standard ONNX operators")
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # onnx.checker.ValidationError and the C++ checker's other refusals
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExtendserveError(f"{where}: not a valid ONNX model ({first}); export it again with a current "
                               "exporter (torch.onnx.export, tf2onnx)") from None
