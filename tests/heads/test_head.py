"""Head files are untrusted: refused clearly, and never allowed to run code."""

import pickle
from pathlib import Path

import pytest
import torch

from extendserve.errors import HeadFileError
from extendserve.heads.head import load_head

from conftest import run_cli


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2, 1280), "bias": torch.zeros(2), "x": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(HeadFileError, match="refused"):
        load_head(tmp_path / "evil.pt")
    r = run_cli("build", "--new-head", str(tmp_path / "evil.pt"), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "refused" in r.stderr
    assert not marker.exists() and not (tmp_path / "m").exists()


def test_plain_pickle_refused(tmp_path):
    marker = tmp_path / "pwned2"
    (tmp_path / "p.pt").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(HeadFileError):
        load_head(tmp_path / "p.pt")
    assert not marker.exists()


def test_corrupt_and_truncated(tmp_path, synthetic_head):
    data = synthetic_head.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(HeadFileError, match="corrupt or truncated"):
        load_head(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(HeadFileError):
        load_head(tmp_path / "junk.pt")
    with pytest.raises(HeadFileError, match="no such file"):
        load_head(tmp_path / "missing.pt")


@pytest.mark.parametrize("keys", [("weight", "bias"), ("fc.weight", "fc.bias"), ("classifier.weight", "classifier.bias")])
def test_foreign_state_dicts(tmp_path, keys):
    torch.save({keys[0]: torch.randn(2, 1280), keys[1]: torch.zeros(2)}, tmp_path / "h.pt")
    (tmp_path / "c.txt").write_text("cat\ndog\n")
    head = load_head(tmp_path / "h.pt", tmp_path / "c.txt")
    assert head.classes == ["cat", "dog"] and head.weight.shape == (2, 1280)


def test_bad_class_lists(tmp_path):
    torch.save({"weight": torch.randn(2, 1280), "bias": torch.zeros(2)}, tmp_path / "h.pt")
    (tmp_path / "dup.txt").write_text("cat\ncat\n")
    with pytest.raises(HeadFileError, match="more than once"):
        load_head(tmp_path / "h.pt", tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(HeadFileError, match="no class names"):
        load_head(tmp_path / "h.pt", tmp_path / "empty.txt")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(HeadFileError, match="3 class names for 2"):
        load_head(tmp_path / "h.pt", tmp_path / "three.txt")


def test_other_backbone_or_weights(synthetic_head, tmp_path):
    obj = torch.load(synthetic_head, weights_only=True)
    obj["backbone_digest"] = "0" * 64
    torch.save(obj, tmp_path / "other.pt")
    r = run_cli("build", "--new-head", str(tmp_path / "other.pt"), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "other weights" in r.stderr and "--force" in r.stderr
    run_cli("build", "--new-head", str(tmp_path / "other.pt"), "-o", str(tmp_path / "m"), "--force")
    obj["backbone"] = "efficientnet_lite9"
    torch.save(obj, tmp_path / "lite9.pt")
    r = run_cli("build", "--new-head", str(tmp_path / "lite9.pt"), "-o", str(tmp_path / "m2"), check=False)
    assert r.returncode == 2 and "efficientnet_lite9" in r.stderr and "efficientnet_lite0" in r.stderr


def test_duplicate_classes_across_heads(synthetic_head, tmp_path):
    r = run_cli("build", "--new-head", str(synthetic_head), "--new-head", str(synthetic_head), "-o", str(tmp_path / "m"),
                check=False)
    assert r.returncode == 2 and "more than once" in r.stderr


def test_zip_bomb_head_refused_before_unpacking(tmp_path):
    """A head file of a few MB whose tensors unpack to over a GB (deflated zeros) is refused from its
    zip directory: it once cost 2.6 GB of memory before it was refused."""
    import resource
    import zipfile

    bomb = tmp_path / "bomb.pt"
    torch.save({"weight": torch.zeros(2, 1280), "bias": torch.zeros(2)}, bomb)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("bomb/data/9", "w", force_zip64=True) as f:
            zeros = bytes(64 * 1024 * 1024)
            for _ in range(18):  # 1.1 GB of zeros, a few MB deflated
                f.write(zeros)
    assert bomb.stat().st_size < 8 * 1024 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(HeadFileError, match="unpack to 1152 MB"):
        load_head(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KB: nothing unpacked
    r = run_cli("build", "--new-head", str(bomb), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "refused" in r.stderr and not (tmp_path / "m").exists()
