"""--unfreeze-top K: a fine-tuned private copy of the top blocks, the ImageNet outputs untouched."""

import json

import numpy as np
import pytest
import torch

from extendserve.bases.pretrained import load_backbone
from extendserve.heads.head import load_head
from extendserve.serving.runtime import Model

from conftest import run_cli


@pytest.fixture(scope="module")
def unfrozen_head(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("unfreeze") / "top1.pt"
    run_cli("train-head", str(synthetic_data), "-o", str(out), "--holdout", "0", "--unfreeze-top", "1",
            "--freeze", "*_depthwise_conv.*")
    return out


def test_head_carries_the_fine_tuned_copy(unfrozen_head):
    head = load_head(unfrozen_head)
    bb = load_backbone()
    assert head.settings["unfreeze_top"] == 1 and head.settings["freeze"] == ["*_depthwise_conv.*"]
    orig = bb.model.state_dict()
    top = {k[len("top."):]: v for k, v in head.extras.items() if k.startswith("top.")}
    assert "_blocks.15._project_conv.weight" in top and "_conv_head.weight" in top
    # --freeze kept the depthwise weights; fine-tuning moved the others.
    assert torch.equal(top["_blocks.15._depthwise_conv.weight"], orig["_blocks.15._depthwise_conv.weight"])
    assert not torch.equal(top["_conv_head.weight"], orig["_conv_head.weight"])
    # The backbone's own weights are untouched by training.
    assert load_backbone().digest == bb.digest


def test_two_branch_build_keeps_imagenet_exact(unfrozen_head, synthetic_head, tmp_path):
    from extendserve.photos.preprocess import prepare

    from conftest import jpeg_bytes, synthetic_photo

    run_cli("build", "--new-head", str(unfrozen_head), "-o", str(tmp_path / "m"))
    run_cli("build", "-o", str(tmp_path / "plain"))
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert m["heads"][1]["settings"]["unfreeze_top"] == 1
    rng = np.random.default_rng(0)
    cfg = Model(tmp_path / "plain").preprocess
    x = np.concatenate([rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8),
                        np.stack([prepare(jpeg_bytes(synthetic_photo(k, 900 + k)), cfg) for k in (0, 1)])])
    got = Model(tmp_path / "m").run(x)
    assert np.abs(got[:, :1000] - Model(tmp_path / "plain").run(x)).max() < 1e-4
    # The fine-tuned branch still names the synthetic classes on fresh photos of them.
    labels = Model(tmp_path / "m").labels
    assert [labels[i] for i in got[2:].argmax(1)] == ["red discs", "blue stripes"]


def test_freeze_needs_unfreeze_and_must_leave_something(synthetic_data, tmp_path):
    r = run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h.pt"), "--freeze", "*", check=False)
    assert r.returncode == 2 and "--unfreeze-top" in r.stderr
    r = run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h.pt"), "--unfreeze-top", "1",
                "--freeze", "*", "--holdout", "0", check=False)
    assert r.returncode == 2 and "nothing" in r.stderr and not (tmp_path / "h.pt").exists()


def test_unfreeze_top_out_of_range_fails_before_reading_photos(synthetic_data, tmp_path):
    r = run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h.pt"), "--unfreeze-top", "99", check=False)
    assert r.returncode == 2 and "between 0 and 16" in r.stderr and "features" not in r.stderr
