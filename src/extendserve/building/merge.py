"""The merged model: the base graph, untouched, plus one small subgraph per head, one output.

    pixels (uint8 [B, crop, crop, 3]) -> normalisation -> base graph -> base logits [B, K]
                                                         \\-> features -> head A, head B, ...
    logits = concat(base logits, head A, head B, ...)      [B, K + N]
    scores = softmax(logits)                                [B, K + N]

The base's own nodes compute the first K outputs exactly as the base alone does; each head's
graph (exported from its torch scorer, :mod:`scoring`) reads the base's feature tensor and its
logits (a ``--unfreeze-top`` head: the activation entering its first copied block).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from ..bases.base import FEATURES, PIXELS, Base
from ..heads.head import Head
from ..heads.scoring import head_graph, unfrozen

OUTPUT = "logits"
SCORES = "scores"  # softmax over all K + N outputs: what the service serves (see calibrated)


@dataclass
class Wiring:
    """Where each head reads from, worked out once per build and handed to the merge and to the
    verification: the base adapted to give its logits, features and every tap, and each tap's shape."""

    sources: list[str]  # per head: the tensor it reads
    taps: list[str]  # the tensors other than the features that some head reads
    adapted: onnx.ModelProto  # uint8 pixels -> base, outputs: logits, features, *taps
    shapes: dict[str, tuple[int, ...]]  # one photo's shape of each tensor a head reads

    @property
    def reference_outputs(self) -> list[str]:
        return [FEATURES, *self.taps]


def wire(base: Base, heads: Sequence[Head]) -> Wiring:
    """Tap shapes are measured in one run of the adapted base (shape inference loses them at Pads)."""
    import numpy as np

    from ..sessions import make_session

    sources = [base.head_input(unfrozen(h)) for h in heads]
    taps = sorted(set(sources) - {FEATURES})
    adapted = base.adapted(["logits", "features", *taps])
    shapes: dict[str, tuple[int, ...]] = {FEATURES: (base.feature_dim,)}
    if taps:
        zeros = np.zeros((1, base.input_size, base.input_size, 3), np.uint8)
        got = make_session(adapted.SerializeToString(), "cpu").run(taps, {PIXELS: zeros})
        shapes |= {t: tuple(x.shape[1:]) for t, x in zip(taps, got)}
    return Wiring(sources, taps, adapted, shapes)


def merged_model(base: Base, heads: Sequence[Head], wiring: Wiring, metadata: dict[str, str] | None = None
                 ) -> onnx.ModelProto:
    """One ONNX model: the adapted base and every head wired to it, outputs concatenated."""
    model = onnx.ModelProto()
    model.CopyFrom(wiring.adapted)
    g = model.graph
    del g.output[:]
    old = "extendserve/old_logits"
    g.node.append(helper.make_node("Cast", [base.logits], [old], to=TensorProto.FLOAT, name="extendserve/old_logits"))
    outs = [old]
    for i, (h, source) in enumerate(zip(heads, wiring.sources)):
        sub = head_graph(h, base.backbone, wiring.shapes[source], len(base.labels), base.opset).graph
        prefix = f"head{i}/"
        wiring_names = {"features": source, "old_logits": old}
        names = {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}

        def rename(x: str) -> str:
            return wiring_names.get(x, prefix + x if x in names else x)

        for t in sub.initializer:
            t.name = prefix + t.name
        for n in sub.node:
            n.name = prefix + (n.name or n.op_type)
            n.input[:] = [rename(x) for x in n.input]
            n.output[:] = [rename(x) for x in n.output]
        g.initializer.extend(sub.initializer)
        g.node.extend(sub.node)
        outs.append(prefix + "new_logits")
    total = len(base.labels) + sum(len(h.classes) for h in heads)
    g.node.append(helper.make_node("Concat", outs, [OUTPUT], axis=1, name="extendserve/concat"))
    g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", total]))
    g.node.append(helper.make_node("Softmax", [OUTPUT], [SCORES], axis=1, name="extendserve/scores"))
    g.output.append(helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["batch", total]))
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def metadata(labels: list[str], preprocess: dict, heads_meta: list[dict], base: Base, producer: str) -> dict[str, str]:
    return {"labels": json.dumps(labels), "preprocess": json.dumps(preprocess),
            "heads": json.dumps([{k: m[k] for k in ("name", "offset", "count")} for m in heads_meta]),
            "backbone": base.name, "base_digest": base.digest, "producer": producer}
