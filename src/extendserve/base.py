"""The base: an ImageNet-style classifier in ONNX, whose final linear classifier new heads sit
beside. Any such ONNX file can be a base (``--base FILE.onnx``); each built-in backbone becomes one
too, exported once per weights digest, so building and training follow one path for both.

From the graph we read the input (name, NCHW or NHWC, dtype), find the final classifier (Gemm,
MatMul + Add, or a 1x1 Conv + Flatten/Reshape; a trailing Softmax is recognised and the logits
before it are the base's outputs), and take the tensor feeding it as the features. The graph is
never edited: a uint8 NHWC input and the normalisation are put in front of it, and what follows
is added after it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .config import PreprocessConfig, cache_root
from .errors import BadImageError, ExtendserveError
from .names import read_names
from .preprocess import read_regular_file

PIXELS = "pixels"
TORCHVISION = {"resize": 256, "crop": 224, "interpolation": "bilinear",
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # 0-1 units, as torchvision writes
_PASS_THROUGH = {"Identity", "Dropout"}


@dataclass
class Base:
    """A base classifier and everything that belongs with it, so nothing can be mismatched."""

    name: str
    digest: str  # built-in: digest of the weights; a file: sha256 of the ONNX bytes
    source: str
    model: onnx.ModelProto
    input_name: str
    layout: str  # NCHW | NHWC
    input_type: int  # onnx TensorProto element type of the base input
    features: str  # the tensor feeding the classifier
    features_4d: bool  # [B, D, 1, 1] in front of a 1x1 conv classifier
    logits: str  # the base's own logits (before any trailing Softmax)
    weight: np.ndarray  # [K, D] the classifier, read from the graph
    bias: np.ndarray  # [K]
    labels: list[str]
    preprocess: PreprocessConfig
    taps: dict[int, str] = field(default_factory=dict)  # built-in: block index -> tensor entering it
    backbone: Any = None  # built-in: the torch EfficientNetLite (for --unfreeze-top)
    restore_report: dict | None = None  # built-in with --weights: what was restored

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def input_size(self) -> int:
        return self.preprocess.crop

    @property
    def opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def head_input(self, top_k: int) -> str:
        """The tensor a head reads: the features, or for a head with a fine-tuned copy of the top
        ``top_k`` blocks, the activation entering the first of them."""
        if not top_k:
            return FEATURES
        if self.backbone is None:
            raise ExtendserveError("a head trained with --unfreeze-top needs the built-in backbone it was "
                                   "fine-tuned from; build with --backbone, not --base")
        return self.taps[len(self.backbone._blocks) - top_k]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "source": self.source, "input": self.input_name,
                "layout": self.layout, "input_dtype": TensorProto.DataType.Name(self.input_type).lower(),
                "features": self.features, "feature_dim": self.feature_dim, "logits": self.logits,
                "classes": len(self.labels), "opset": self.opset}

    def identity(self) -> dict[str, Any]:
        """What a head trained on this base depends on besides its weights: the preprocessing that
        made its features and the labels served beside it. A feature cache key and build's check."""
        return {"preprocess": self.preprocess.to_dict(),
                "labels_sha256": hashlib.sha256("\n".join(self.labels).encode("utf-8")).hexdigest()}

    def adapted(self, outputs: Sequence[str] = ()) -> onnx.ModelProto:
        """uint8 NHWC ``pixels`` -> normalisation -> the base graph, with ``outputs`` (tensor names;
        'features' gives the pooled [B, D] features, 'logits' the base logits) as its outputs."""
        g = onnx.GraphProto()
        g.CopyFrom(self.model.graph)
        del g.output[:]
        targets = [FEATURES if n == "features" else self.logits if n == "logits" else n for n in outputs]
        extra = self._features_nodes() if FEATURES in targets else []
        needed = {t for t in targets if t != FEATURES} | ({self.features} if extra else set())
        kept = []
        for n in reversed(self.model.graph.node):  # topological order: keep what the outputs need
            if any(o in needed for o in n.output):
                kept.append(n)
                needed.update(i for i in n.input if i)
        del g.node[:]
        g.node.extend(_adapter(self) + kept[::-1] + extra)
        others = [i for i in self.model.graph.input if i.name != self.input_name]
        del g.input[:]
        g.input.extend([helper.make_tensor_value_info(PIXELS, TensorProto.UINT8,
                                                      ["batch", self.input_size, self.input_size, 3])] + others)
        g.initializer.extend(_adapter_constants(self))
        for tensor in targets:
            g.output.append(helper.make_tensor_value_info(tensor, self._type_of(tensor), None))
        m = helper.make_model(g, opset_imports=list(self.model.opset_import), producer_name="extendserve")
        m.ir_version = self.model.ir_version
        return m

    def _type_of(self, tensor: str) -> int:
        if tensor == FEATURES:
            return TensorProto.FLOAT
        inferred = onnx.shape_inference.infer_shapes(self.model)
        for v in list(inferred.graph.value_info) + list(inferred.graph.output):
            if v.name == tensor and v.type.tensor_type.elem_type:
                return v.type.tensor_type.elem_type
        return TensorProto.FLOAT

    def _features_nodes(self) -> list[onnx.NodeProto]:
        """The features as float32 [B, D] under the name FEATURES, whatever the base gives."""
        src = self.features
        nodes = []
        if self.features_4d:
            nodes.append(helper.make_node("Flatten", [src], ["extendserve/features_flat"], axis=1,
                                          name="extendserve/flatten"))
            src = "extendserve/features_flat"
        nodes.append(helper.make_node("Cast", [src], [FEATURES], to=TensorProto.FLOAT, name="extendserve/features"))
        return nodes


FEATURES = "extendserve/features"


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename one tensor everywhere in ``graph`` (its name clashes with one extendserve owns)."""
    for n in graph.node:
        n.input[:] = [new if x == old else x for x in n.input]
        n.output[:] = [new if x == old else x for x in n.output]
    for v in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer):
        if v.name == old:
            v.name = new


def _adapter(base: Base) -> list[onnx.NodeProto]:
    """pixels uint8 [B, H, W, 3] -> (x - mean) / std in the base's layout and dtype."""
    nodes = [helper.make_node("Cast", [PIXELS], ["extendserve/px"], to=TensorProto.FLOAT, name="extendserve/cast"),
             helper.make_node("Sub", ["extendserve/px", "extendserve/mean"], ["extendserve/centred"], name="extendserve/sub"),
             helper.make_node("Mul", ["extendserve/centred", "extendserve/inv_std"], ["extendserve/normalised"],
                              name="extendserve/mul")]
    x = "extendserve/normalised"
    if base.layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [x], ["extendserve/nchw"], perm=[0, 3, 1, 2], name="extendserve/nchw"))
        x = "extendserve/nchw"
    nodes.append(helper.make_node("Cast", [x], [base.input_name], to=base.input_type, name="extendserve/to_base"))
    return nodes


def _adapter_constants(base: Base) -> list[onnx.TensorProto]:
    mean = np.array(base.preprocess.mean, np.float32)
    inv_std = (1.0 / np.array(base.preprocess.std, np.float32)).astype(np.float32)
    return [numpy_helper.from_array(mean, "extendserve/mean"), numpy_helper.from_array(inv_std, "extendserve/inv_std")]


# --------------------------------------------------------------------------- finding the classifier


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


def _input(model: onnx.ModelProto, where: str) -> tuple[str, str, int, int | None]:
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
    """Keys ``resize``, ``crop``, ``interpolation``, ``mean``, ``std`` (0-1 units; torchvision's
    ImageNet values for those absent) -> our config, every value checked."""
    d = dict(TORCHVISION)
    if size:
        d["crop"], d["resize"] = size, round(size * 256 / 224)
    if given is not None:
        unknown = set(given) - set(TORCHVISION) if isinstance(given, dict) else {"(not an object)"}
        if unknown:
            raise ExtendserveError(f"{where}: expected keys {sorted(TORCHVISION)}, found {sorted(unknown)}")
        d |= given
    try:
        mean = [float(v) * 255 for v in d["mean"]]
        std = [float(v) * 255 for v in d["std"]]
        cfg = PreprocessConfig(resize=int(d["resize"]), crop=int(d["crop"]), interpolation=str(d["interpolation"]),
                               mean=tuple(mean), std=tuple(std))  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ExtendserveError(f"{where}: bad value ({e})") from None
    if not all(math.isfinite(v) for v in (*mean, *std)):
        raise ExtendserveError(f"{where}: mean and std must be finite numbers, not NaN or Infinity "
                               f"(mean {d['mean']}, std {d['std']})")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or not 0 < cfg.crop <= cfg.resize * 2:
        raise ExtendserveError(f"{where}: mean and std need 3 values each (std > 0), crop and resize "
                               "positive sizes")
    if cfg.interpolation not in ("bilinear", "bicubic"):
        raise ExtendserveError(f"{where}: interpolation must be bilinear or bicubic")
    if size and cfg.crop != size:
        raise ExtendserveError(f"{where}: crop {cfg.crop}, but the model's input is {size}x{size}")
    return cfg


def _preprocess_of(model: onnx.ModelProto, path: Any, size: int | None, where: str) -> PreprocessConfig:
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


def _labels(path: str | os.PathLike[str] | None, model: onnx.ModelProto, k: int, where: str) -> list[str]:
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


def load_base(path: str | os.PathLike[str], preprocess: str | os.PathLike[str] | None = None,
              labels: str | os.PathLike[str] | None = None) -> Base:
    """``--base FILE.onnx``: any ImageNet-style classifier exported to ONNX."""
    where = str(path)
    try:
        data = read_regular_file(path, 4 * 1024**3, "ONNX model")
        model = onnx.load_from_string(data)
    except BadImageError as e:
        raise ExtendserveError(str(e)) from None
    except Exception as e:  # protobuf's DecodeError and friends
        raise ExtendserveError(f"{where}: not an ONNX model ({str(e)[:120]}); give a .onnx file") from None
    self_contained(model, where)
    return _base_from_model(model, hashlib.sha256(data).hexdigest(), Path(path).stem, str(Path(path).absolute()),
                            preprocess, labels, where)


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


def _base_from_model(model: onnx.ModelProto, digest: str, name: str, source: str, preprocess: Any, labels: Any,
                     where: str) -> Base:
    for owned in (PIXELS, "logits"):  # names of the merged model's own input and output
        if any(owned in (*n.input, *n.output) for n in model.graph.node) or any(
                v.name == owned for v in list(model.graph.input) + list(model.graph.output)):
            _rename(model.graph, owned, f"base/{owned}")
    name_in, layout, dtype, size = _input(model, where)
    features, is4d, logits, w, b = find_classifier(model, where)
    cfg = preprocess if isinstance(preprocess, PreprocessConfig) else _preprocess_of(model, preprocess, size, where)
    labels_list = labels if isinstance(labels, list) else _labels(labels, model, w.shape[0], where)
    if not all(np.isfinite(w).ravel()) or not all(np.isfinite(b)):
        raise ExtendserveError(f"{where}: its classifier weights hold NaN or infinity")
    return Base(name=name, digest=digest, source=source, model=model, input_name=name_in, layout=layout,
                input_type=dtype, features=features, features_4d=is4d, logits=logits, weight=w, bias=b,
                labels=labels_list, preprocess=cfg)


def builtin_base(loaded: Any) -> Base:
    """A registry backbone (a ``backbone.LoadedBackbone``) as a base: its float NCHW graph exported
    once per weights digest and cached, its preprocessing and labels from the registry."""
    import torch

    from .onnx_export import export_module

    spec = loaded.spec
    path = cache_root() / "bases" / f"{spec.name}-{loaded.digest[:16]}.onnx"
    model = None
    if path.is_file():
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as e:
            sys.stderr.write(f"warning: cached base graph {path} does not load ({str(e)[:80]}); exporting it again\n")
            model = None
    if model is None:
        size = spec.input_size
        data = export_module(loaded.model.eval(), (torch.zeros(2, 3, size, size),), ["image"], ["base_logits"])
        model = onnx.load_from_string(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: exported again next time
    base = _base_from_model(model, loaded.digest, spec.name, spec.weights_package, spec.preprocess,
                            list(spec.labels), spec.name)
    base.backbone = loaded.model
    base.restore_report = loaded.restore_report
    base.taps = _block_inputs(model.graph)
    return base


def _block_inputs(graph: onnx.GraphProto) -> dict[int, str]:
    """Block index -> the tensor entering it, from the exporter's node names (``/_blocks.N/...``)."""
    taps: dict[int, str] = {}
    for n in graph.node:
        if n.name.startswith("/_blocks.") and n.input and n.op_type != "Constant":
            i = int(n.name.split("/")[1].split(".")[1])
            taps.setdefault(i, n.input[0])
    return taps


def resolve_base(backbone: str | None = None, weights: Any = None, restore: str = "all", exclude: Sequence[str] = (),
                 base: str | None = None, preprocess: str | None = None, labels: str | None = None) -> Base:
    """The base the command line names: ``--base FILE.onnx`` or a built-in ``--backbone``."""
    if base is not None:
        if weights:
            raise ExtendserveError("--weights restores a built-in backbone's weights; with --base, export your "
                                   "fine-tuned classifier to ONNX and give that file")
        return load_base(base, preprocess, labels)
    if preprocess or labels:
        raise ExtendserveError("--preprocess and --labels describe a --base FILE.onnx; a built-in --backbone "
                               "carries its own")
    from .backbone import load_backbone

    return builtin_base(load_backbone(backbone, weights, restore, exclude))
