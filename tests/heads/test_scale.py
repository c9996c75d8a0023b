"""Scale: distances as matrix products (no photos x classes x features arrays), a head graph whose
size does not grow with its classes, and the CPU engine chosen by measurement with the same
decisions. Speed and memory figures are in bench/heads/scale_bench.py, not asserted here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extendserve.errors import ExtendserveError
from extendserve.heads.head import Head
from extendserve.heads.metric import Metric, fit_metric
from extendserve.heads.scoring import Distances, head_graph
from extendserve.serving.runtime import Model


def direct_distances(metric: Metric, feats: np.ndarray) -> np.ndarray:
    """The metric written out term by term, [m, n, D] at once: the reference for small sizes."""
    u = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    z = u[:, None, :].astype(np.float64) - metric.means[None].astype(np.float64)
    v = metric.basis.astype(np.float64)
    proj = z @ v
    rest = z - proj @ v.T
    return ((rest * rest).sum(-1) + (proj * proj * (1 - metric.weights)).sum(-1)) / metric.sigma


@pytest.mark.parametrize("photos,views", [(30, 3), (700, 2)])  # fewer views than dimensions, and more
def test_distances_as_matrix_products_equal_the_direct_form(photos, views):
    rng = np.random.default_rng(0)
    n, d = 7, 64
    centres = rng.normal(size=(n, d))
    labels = np.arange(photos) % n
    feats = (centres[labels, None, :] + 0.6 * rng.normal(size=(photos, views, d))).astype(np.float32)
    metric = fit_metric(np.abs(feats), labels, n, 0.8, 16)
    probe = np.abs(rng.normal(size=(50, d)) + centres[rng.integers(0, n, 50)]).astype(np.float32)
    want = direct_distances(metric, probe)
    got = metric.distances(probe)
    assert np.allclose(got, want, rtol=1e-6, atol=1e-6 * want.max())  # the basis is stored in float32
    in_graph = Distances(*(torch.from_numpy(np.asarray(x)) for x in (metric.means, metric.basis, metric.weights)),
                         torch.tensor([metric.sigma]))
    unit = probe / np.linalg.norm(probe, axis=1, keepdims=True)
    with torch.no_grad():
        graph = in_graph(torch.from_numpy(unit)).numpy()
    assert np.allclose(graph, want, rtol=1e-5, atol=1e-6 * want.max())


def random_calibrated(n: int, d: int = 1280, rank: int = 64) -> Head:
    g = torch.Generator().manual_seed(n)
    means = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q
    return Head(classes=[f"class {i}" for i in range(n)], weight=torch.randn(n, d, generator=g) * 0.01,
                bias=torch.zeros(n), backbone="efficientnet_lite0", backbone_digest="", method="calibrated",
                extras={"means": means, "basis": basis, "basis_weights": torch.full((rank,), 0.5),
                        "sigma": torch.tensor([1e-3]), "power": torch.tensor([0.5]),
                        "coef": torch.tensor([0.01, 1.0, 0.001, 0.5]), "offset": torch.tensor([-3.0]),
                        "world_mean": means[:1].clone(), "world_basis": basis.clone(),
                        "world_basis_weights": torch.full((rank,), 0.5), "world_sigma": torch.tensor([1e-3])})


def test_head_graph_does_not_grow_with_its_classes():
    """One matrix product for all classes: the same nodes at 5 and at 1000 classes, only wider tensors."""
    small = head_graph(random_calibrated(5), None, (1280,), 1000, 17).graph
    large = head_graph(random_calibrated(1000), None, (1280,), 1000, 17).graph
    assert sorted(n.op_type for n in small.node) == sorted(n.op_type for n in large.node)
    assert len(large.node) < 100
    biggest = max(int(np.prod(t.dims)) for t in large.initializer)
    assert biggest <= 1280 * 1000  # no photos x classes x features constant or per-class copy


def test_engine_choice_keeps_decisions(built_model):
    pytest.importorskip("openvino")
    ort_model = Model(built_model, engine="onnxruntime")
    ov_model = Model(built_model, engine="openvino")
    auto = Model(built_model, engine="auto")
    assert ov_model.engine.name == "openvino" and ort_model.engine.name == "onnxruntime"
    assert auto.engine_report["top1_differ"] == 0 and auto.engine_report["checked_inputs"] >= 16
    assert set(auto.engine_report["photos_per_s"]) == {"onnxruntime", "openvino"}
    rates, spread = auto.engine_report["photos_per_s"], auto.engine_report["spread"]
    # OpenVINO serves only where it is faster by more than the noise measured beside it
    assert (auto.engine.name == "openvino") == (rates["openvino"] / rates["onnxruntime"] - 1 > max(0.05, spread))
    assert auto.providers == (["OpenVINO CPU"] if auto.engine.name == "openvino" else ["CPUExecutionProvider"])


def test_openvino_precision_is_read_from_the_type_it_answers():
    """OpenVINO answers the precision hint with a type (``<Type: 'bfloat16'>``), not "bf16"."""
    ov = pytest.importorskip("openvino")
    from extendserve.engines import precision_name

    assert precision_name(ov.Type.bf16) == "bf16" and precision_name(ov.Type.f32) == "f32"
    assert precision_name("bf16") == "bf16" and precision_name("f32") == "f32"


def test_a_model_with_no_new_head_runs_on_openvino(tmp_path):
    """A plain model's logits tensor has several names (logits, base_logits): OpenVINO finds it by any."""
    pytest.importorskip("openvino")
    from conftest import run_cli

    run_cli("build", "-o", str(tmp_path / "plain"), "--no-store")
    x = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    ov_model, ort_model = Model(tmp_path / "plain", engine="openvino"), Model(tmp_path / "plain")
    a, b = ov_model.run(x), ort_model.run(x)
    assert a.shape == (2, 1000) and (a.argmax(1) == b.argmax(1)).all()
    assert (ov_model.probabilities(x).argmax(1) == a.argmax(1)).all()
    x = np.random.default_rng(1).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    a, b = ort_model.run(x), ov_model.run(x)
    assert (a.argmax(1) == b.argmax(1)).all()
    assert float(np.abs(a - b).max()) <= 2e-4 * max(1.0, float(np.abs(a).max()))


def test_bad_engine_is_refused(built_model):
    with pytest.raises(ExtendserveError, match="EXTENDSERVE_ENGINE"):
        Model(built_model, engine="tensorrt")


def test_bf16_only_when_asked_and_its_changes_reported(synthetic_head, built_model, tmp_path):
    """``build --cpu-precision bf16`` reports what bf16 changes on this CPU (or that this CPU runs
    f32 anyway); only such a model lets OpenVINO serve in bf16, with changed decisions counted."""
    ov = pytest.importorskip("openvino")
    from conftest import run_cli

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    r = run_cli("build", "--new-head", str(synthetic_head), "-o", str(tmp_path / "m"), "--cpu-precision", "bf16",
                "--no-store")
    model = Model(tmp_path / "m", engine="openvino")
    report = model.manifest.verification["bf16"]
    assert model.manifest.cpu_precision == "bf16"
    assert report["runs_here"] == ("bf16" if has_bf16 else "f32") == model.engine_report["openvino_precision"]
    assert report["inputs"] >= 24 and 0 <= report["top1_changed"] <= report["inputs"]
    assert ("changes" if has_bf16 else "has no bf16 instructions") in r.stdout
    plain = Model(built_model, engine="openvino")  # built without asking: f32 whatever the CPU
    assert plain.manifest.cpu_precision == "f32" and plain.engine_report["openvino_precision"] == "f32"
    assert "bf16" not in plain.manifest.verification
