"""--weights / --restore / --exclude, and build --from: real checkpoints, real builds."""

import json

import numpy as np
import pytest
import torch

from extendserve.bases.backbone import build
from extendserve.bases.registry import get_spec
from extendserve.serving.runtime import Model

from conftest import run_cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Lite0's own weights 'fine-tuned elsewhere': classifier bias +1, one block's BN bias changed,
    one tensor dropped, one of another shape, one extra entry; wrapped as trainers save them."""
    spec = get_spec("efficientnet_lite0")
    state = torch.load(spec.weights_path(), weights_only=True)
    state["_fc.bias"] = state["_fc.bias"] + 1.0
    state["_blocks.15._bn2.bias"] = state["_blocks.15._bn2.bias"] + 0.5
    del state["_bn1.weight"]
    state["_bn1.bias"] = torch.zeros(7)
    state["aux_head.weight"] = torch.zeros(3)
    path = tmp_path_factory.mktemp("ckpt") / "finetuned.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, path)
    return path


def logits(model_dir) -> np.ndarray:
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    return Model(model_dir).run(x)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "m"
    run_cli("build", "-o", str(out))
    return out


def test_restore_all_reports_and_is_recorded(checkpoint, plain, tmp_path):
    r = run_cli("build", "--weights", str(checkpoint), "-o", str(tmp_path / "m"))
    assert "restored" in r.stderr
    assert "not in the checkpoint, left as the registry's: _bn1.weight" in r.stderr
    assert "shape mismatch, skipped: _bn1.bias: checkpoint (7,), model (1280,)" in r.stderr
    assert "in the checkpoint, not in the model: aux_head.weight" in r.stderr
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    rep = m["backbone"]["restored_weights"]
    assert "_fc.bias" in rep["restored"] and rep["missing"] == ["_bn1.weight"] and rep["mode"] == "all"
    assert m["settings"]["weights"] == str(checkpoint)
    # The ImageNet outputs are exactly those of the registry model with the two restored changes
    # made by hand (the dropped and the mis-shaped tensors stay the registry's).
    spec = get_spec("efficientnet_lite0")
    ref = build(spec)
    ref.load_state_dict(torch.load(spec.weights_path(), weights_only=True))
    with torch.no_grad():
        ref._fc.bias += 1.0
        ref._blocks[15]._bn2.bias += 0.5
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        want = ref.eval()((torch.from_numpy(x).permute(0, 3, 1, 2).float() - 127.0) / 128.0).numpy()
    assert np.abs(logits(tmp_path / "m") - want).max() < 1e-4
    assert np.abs(logits(plain) - want).max() > 0.5
    assert m["backbone"]["digest"] != json.loads((plain / "manifest.json").read_text())["backbone"]["digest"]


def test_restore_backbone_keeps_classifier_and_exclude(checkpoint, plain, tmp_path):
    r = run_cli("build", "--weights", str(checkpoint), "--restore", "backbone", "--exclude", "_blocks.15.*",
                "-o", str(tmp_path / "m"))
    assert "kept the registry's classifier: _fc.weight, _fc.bias" in r.stderr
    assert "excluded by --exclude: _blocks.15." in r.stderr
    rep = json.loads((tmp_path / "m" / "manifest.json").read_text())["backbone"]["restored_weights"]
    assert rep["kept_classifier"] == ["_fc.weight", "_fc.bias"] and rep["exclude"] == ["_blocks.15.*"]
    assert all(n.startswith("_blocks.15.") for n in rep["excluded"]) and rep["excluded"]
    # Classifier kept, block 15 excluded, the rest identical to the registry: the original logits.
    np.testing.assert_allclose(logits(tmp_path / "m"), logits(plain), atol=1e-4)


def test_checkpoint_that_restores_nothing_or_runs_code_is_refused(tmp_path):
    torch.save({"layer.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    r = run_cli("build", "--weights", str(tmp_path / "other.pt"), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "restores nothing" in r.stderr and not (tmp_path / "m").exists()
    r = run_cli("build", "--exclude", "x*", "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "--weights" in r.stderr

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"_fc.bias": Evil()}, tmp_path / "evil.pt")
    r = run_cli("build", "--weights", str(tmp_path / "evil.pt"), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "refused" in r.stderr and not marker.exists()


def test_head_is_tied_to_the_weights_it_was_trained_on(checkpoint, synthetic_data, tmp_path):
    head = tmp_path / "h.pt"
    run_cli("train-head", str(synthetic_data), "-o", str(head), "--holdout", "0", "--weights", str(checkpoint))
    r = run_cli("build", "--new-head", str(head), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "digest" in r.stderr.lower()
    run_cli("build", "--new-head", str(head), "--weights", str(checkpoint), "-o", str(tmp_path / "m"))
    assert Model(tmp_path / "m").labels[1000:] == ["blue stripes", "red discs"]


def test_build_from_manifest_is_reproducible(built_model, synthetic_head, tmp_path):
    import shutil

    r = run_cli("build", "--from", str(built_model / "manifest.json"), "-o", str(tmp_path / "again"))
    assert "byte-identical" in r.stdout
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (built_model / "model.onnx").read_bytes()
    # A head file that changed since is refused, and nothing is written.
    copy = tmp_path / "copy"
    shutil.copytree(built_model, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["heads"][1]["digest"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(m))
    r = run_cli("build", "--from", str(copy / "manifest.json"), "-o", str(tmp_path / "third"), check=False)
    assert r.returncode == 2 and "changed since" in r.stderr and not (tmp_path / "third").exists()
