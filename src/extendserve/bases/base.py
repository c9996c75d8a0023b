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
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..config import FEATURES, PreprocessConfig, cache_root
from ..errors import ExtendserveError
from ..files import FileReadError, read_regular_file, write_atomic
from .onnx_file import find_classifier, input_of, labels_of, preprocess_of, self_contained

PIXELS = "pixels"


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
        return self.taps[self.backbone.num_blocks - top_k]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "source": self.source, "input": self.input_name,
                "layout": self.layout, "input_dtype": TensorProto.DataType.Name(self.input_type).lower(),
                "features": self.features, "feature_dim": self.feature_dim, "logits": self.logits,
                "classes": len(self.labels), "opset": self.opset}

    def identity(self) -> dict[str, Any]:
        """What a head trained on this base depends on besides its weights: the preprocessing that
        made its features and the labels served beside it. A feature cache key and build's check."""
        return {"preprocess": self.preprocess.to_dict(units=False),
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


def load_base(path: str | os.PathLike[str], preprocess: str | os.PathLike[str] | None = None,
              labels: str | os.PathLike[str] | None = None) -> Base:
    """``--base FILE.onnx``: any ImageNet-style classifier exported to ONNX."""
    where = str(path)
    try:
        data = read_regular_file(path, 4 * 1024**3, "ONNX model")
        model = onnx.load_from_string(data)
    except FileReadError as e:
        raise ExtendserveError(str(e)) from None
    except Exception as e:  # protobuf's DecodeError and friends
        raise ExtendserveError(f"{where}: not an ONNX model ({str(e)[:120]}); give a .onnx file") from None
    self_contained(model, where)
    return _base_from_model(model, hashlib.sha256(data).hexdigest(), Path(path).stem, str(Path(path).absolute()),
                            preprocess, labels, where)


def _base_from_model(model: onnx.ModelProto, digest: str, name: str, source: str, preprocess: Any, labels: Any,
                     where: str) -> Base:
    for owned in (PIXELS, "logits"):  # names of the merged model's own input and output
        if any(owned in (*n.input, *n.output) for n in model.graph.node) or any(
                v.name == owned for v in list(model.graph.input) + list(model.graph.output)):
            _rename(model.graph, owned, f"base/{owned}")
    name_in, layout, dtype, size = input_of(model, where)
    features, is4d, logits, w, b = find_classifier(model, where)
    cfg = preprocess if isinstance(preprocess, PreprocessConfig) else preprocess_of(model, preprocess, size, where)
    labels_list = labels if isinstance(labels, list) else labels_of(labels, model, w.shape[0], where)
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
            write_atomic(path, data)
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
    from .pretrained import load_backbone

    return builtin_base(load_backbone(backbone, weights, restore, exclude))
