"""torch module -> ONNX bytes: the one place the exporter is called, below every builder."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import onnx
import torch
from torch import nn

OPSET = 17


def export_module(module: nn.Module, examples: tuple[torch.Tensor, ...], input_names: Sequence[str],
                  output_names: Sequence[str], opset: int = OPSET) -> bytes:
    """Export with a dynamic batch axis on every input and output; checked by onnx."""
    module.eval()
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, examples, buf, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
