"""What a careless or hostile user finds on the command line: nothing lost, no traceback, no hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from extendserve.errors import ExtendserveError
from extendserve.names import check_class_names
from extendserve.serving.runtime import Model

from conftest import jpeg_bytes, run_cli, synthetic_photo

# --------------------------------------------------------------------------- build -o never deletes


@pytest.mark.parametrize("layout", ["project", "folder of models and notes"])
def test_build_refuses_a_folder_that_is_not_a_model(synthetic_head, tmp_path, layout):
    target = tmp_path / "target"
    (target / "src").mkdir(parents=True)
    (target / "src" / "code.py").write_text("print('mine')")
    (target / "README.md").write_text("my notes")
    if layout != "project":
        (target / "m1").mkdir()
        (target / "m1" / "manifest.json").write_text('{"format": "extendserve-model"}')
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    r = run_cli("build", "--new-head", str(synthetic_head), "-o", str(target), check=False)
    assert r.returncode == 2 and "not empty and not an extendserve model folder" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    assert (target / "README.md").read_text() == "my notes"


def test_build_into_dot_is_refused(synthetic_head, tmp_path):
    (tmp_path / "keep.txt").write_text("keep")
    r = subprocess.run([sys.executable, "-m", "extendserve", "build", "--new-head", str(synthetic_head), "-o", "."],
                       cwd=tmp_path, capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 2 and (tmp_path / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_model_folder_with_extra_files_is_refused(built_model, synthetic_head, tmp_path):
    target = tmp_path / "m"
    shutil.copytree(built_model, target)
    (target / "notes.txt").write_text("why this model")
    r = run_cli("build", "--new-head", str(synthetic_head), "-o", str(target), check=False)
    assert r.returncode == 2 and "notes.txt" in r.stderr and (target / "notes.txt").exists()


def test_symlinked_output_is_followed_not_replaced(built_model, tmp_path):
    v1 = tmp_path / "v1"
    shutil.copytree(built_model, v1)
    (tmp_path / "current").symlink_to("v1")
    run_cli("build", "-o", str(tmp_path / "current"))  # an ImageNet-only model, into what current names
    assert (tmp_path / "current").is_symlink() and os.readlink(tmp_path / "current") == "v1"
    assert len(json.loads((v1 / "manifest.json").read_text())["labels"]) == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]  # no stray .building-* folder


# --------------------------------------------------------------------------- the model pair checked


def test_manifest_and_model_checked_against_each_other(built_model, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(built_model, m)
    manifest = json.loads((m / "manifest.json").read_text())
    manifest["labels"].append("extra")
    manifest["heads"][-1]["count"] += 1
    (m / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExtendserveError, match="outputs but the manifest has 1003 labels"):
        Model(m)
    # Another build's model.onnx beside this manifest: its sha256 is not the recorded one.
    shutil.copy(built_model / "manifest.json", m / "manifest.json")
    plain = tmp_path / "plain"
    run_cli("build", "-o", str(plain))
    shutil.copy(plain / "model.onnx", m / "model.onnx")
    with pytest.raises(ExtendserveError, match="not the model this manifest.json was built with"):
        Model(m)
    r = run_cli("predict", "--model", str(m), str(m / "manifest.json"), check=False)
    assert r.returncode == 2 and "different builds" in r.stderr


# --------------------------------------------------------------------------- the feature cache


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("features/*/views-v*/*.npz"))


def test_feature_cache_entries_are_checked(synthetic_data, tmp_path):
    cache = tmp_path / "cache"
    env = {"EXTENDSERVE_CACHE": str(cache)}
    first = _train(synthetic_data, tmp_path / "a.pt", env)
    entries = _entries(cache)
    assert len(entries) == 12
    shape, nan, huge, junk = entries[:4]
    with np.load(shape) as z:
        good = {k: z[k] for k in z.files}
    np.savez(shape, **(good | {"features": good["features"][:3]}))
    np.savez(nan, **(good | {"features": np.full_like(good["features"], np.nan)}))
    np.savez(huge, **(good | {"features": np.full_like(good["features"], 1e30)}))
    junk.write_bytes(b"not an npz")
    graph = next(cache.glob("bases/*.onnx"))
    graph.write_bytes(b"corrupt onnx")
    again = _train(synthetic_data, tmp_path / "b.pt", env)
    assert again.stderr.count("feature cache entry") == 4, again.stderr
    assert "recomputing and replacing it" in again.stderr and "Traceback" not in again.stderr
    assert "cached base graph" in again.stderr and "does not load" in again.stderr  # exported again
    assert _held_out(again) == _held_out(first)  # the poisoned entries did not train the head
    third = _train(synthetic_data, tmp_path / "c.pt", env)
    assert "feature cache entry" not in third.stderr and "(12/12 cached)" in third.stdout


def test_unwritable_cache_is_used_read_only(synthetic_data, tmp_path):
    (tmp_path / "a-file").write_text("")  # a cache folder below a file can never be made
    r = _train(synthetic_data, tmp_path / "h.pt", {"EXTENDSERVE_CACHE": str(tmp_path / "a-file" / "cache")})
    assert "cannot be written" in r.stderr and "read-only" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "h.pt").is_file()


def _train(data: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "extendserve", "train-head", str(data), "-o", str(out), "--epochs", "40"],
                       capture_output=True, text=True, env=os.environ | env)
    assert r.returncode == 0, r.stderr
    return r


def _held_out(r: subprocess.CompletedProcess[str]) -> str:
    return next(ln for ln in r.stdout.splitlines() if ln.startswith("held-out accuracy"))


# --------------------------------------------------------------------------- CLI inputs


def test_empty_and_non_pytorch_head_files(tmp_path):
    (tmp_path / "zero.pt").write_bytes(b"")
    r = run_cli("build", "--new-head", str(tmp_path / "zero.pt"), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "empty (0 bytes)" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "cat.jpg").write_bytes(jpeg_bytes(synthetic_photo(0, 1)))
    r = run_cli("build", "--new-head", str(tmp_path / "cat.jpg"), "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "looks like a JPEG photo" in r.stderr
    assert "weights_only" not in r.stderr and "pickled" not in r.stderr


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_eval_imagenet_path_errors(built_model, tmp_path, where):
    path = tmp_path / "nope" if where == "missing" else tmp_path / "file.txt"
    if where == "a file":
        path.write_text("x")
    r = run_cli("eval", "--model", str(built_model), "--imagenet", str(path), check=False)
    assert r.returncode == 2 and str(path) in r.stderr and "Traceback" not in r.stderr


def test_predict_refuses_devices_and_fifos(built_model, tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "extendserve", "predict", "--model", str(built_model), "/dev/zero",
                        str(fifo)], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert r.returncode == 2 and "Traceback" not in r.stderr and "/dev/zero: not a regular file" in r.stderr


# --------------------------------------------------------------------------- class names


@pytest.mark.parametrize("name, words", [("tench", "already classes of"), ("evil\u202etxt", "U+202E"),
                                         (" padded", "whitespace")])
def test_class_folder_names_refused(tmp_path, name, words):
    root = tmp_path / "photos"
    for i, cls in enumerate(["ok", name]):
        (root / cls).mkdir(parents=True)
        synthetic_photo(i, i).save(root / cls / "0.jpg")
    r = run_cli("train-head", str(root), "-o", str(tmp_path / "h.pt"), check=False)
    assert r.returncode == 2 and words in r.stderr and not (tmp_path / "h.pt").exists()


def test_linked_class_folder_refused(tmp_path):
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    synthetic_photo(0, 0).save(root / "cats" / "0.jpg")
    (root / "kittens").symlink_to(root / "cats")
    r = run_cli("train-head", str(root), "-o", str(tmp_path / "h.pt"), check=False)
    assert r.returncode == 2 and "are the same folder" in r.stderr


@pytest.mark.parametrize("names", [["a", ""], ["a", "b\x00c"], ["a", "   "], ["tench"]])
def test_class_list_names_refused(tmp_path, names):
    n = len(names)
    torch.save({"weight": torch.zeros(n, 1280), "bias": torch.zeros(n)}, tmp_path / "h.pt")
    (tmp_path / "names.txt").write_bytes("\n".join(names).encode() + b"\n")
    r = run_cli("build", "--new-head", str(tmp_path / "h.pt"), "--classes", str(tmp_path / "names.txt"),
                "-o", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "m").exists()


def test_fifty_thousand_class_names_checked():
    names = [f"class {i}" for i in range(50_000)]
    check_class_names(names, "big head", taken=["tench"])  # linear: this took 44 s when it was quadratic
    with pytest.raises(ExtendserveError, match="more than once"):
        check_class_names(names + ["class 7"], "big head")


def test_full_disk_and_non_finite_features_are_one_line_errors(synthetic_head, synthetic_data, tmp_path):
    """A write that runs out of room (here: a 5 MB file-size limit, which fails writes as a full disk
    does) and a base that computes NaN features once ended in raw tracebacks."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (5 * 2**20, 5 * 2**20))

    r = subprocess.run([sys.executable, "-m", "extendserve", "build", "--new-head", str(synthetic_head), "-o",
                        str(tmp_path / "m"), "--no-store"], capture_output=True, text=True, preexec_fn=small_files,
                       env=os.environ.copy(), timeout=600)
    assert r.returncode == 2 and "no space left" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())

    class NaNFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.log(x.mean(dim=(2, 3)) - 1e6))  # log of a negative number: NaN

    torch.onnx.export(NaNFeatures().eval(), (torch.zeros(1, 3, 32, 32),), str(tmp_path / "nan.onnx"),
                      input_names=["image"], output_names=["out"], dynamic_axes={"image": {0: "b"}}, dynamo=False)
    r = run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h.pt"), "--base", str(tmp_path / "nan.onnx"),
                check=False)
    assert r.returncode == 2 and "NaN or infinite features" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "h.pt").exists()
