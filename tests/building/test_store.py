"""Models the BentoML way, with a real model store (the test session's own BENTOML_HOME): build ->
store -> serve by tag, an older version served by its tag, export/import to another store, and a
bento built here and served from another directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, jpeg_bytes, run_cli, synthetic_photo
from test_service import Server


def bentoml(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> str:
    r = subprocess.run([sys.executable, "-m", "bentoml", *args], capture_output=True, text=True, cwd=cwd,
                       env=os.environ | (env or {}), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def tag_of(stdout: str) -> str:
    """The version a build saved, or kept (the store's latest was this model already)."""
    return re.search(r"(?:saved to the BentoML model store as|the model store's latest) (extendserve-[\w.-]+:\w+)",
                     stdout).group(1)


@pytest.fixture(scope="module")
def two_versions(synthetic_head, tmp_path_factory):
    """extendserve-shapes: first with the synthetic head (1002 classes), then ImageNet alone (1000)."""
    root = tmp_path_factory.mktemp("store")
    first = tag_of(run_cli("build", "--new-head", str(synthetic_head), "-o", str(root / "shapes"), "--name", "shapes").stdout)
    second = tag_of(run_cli("build", "-o", str(root / "plain"), "--name", "shapes").stdout)
    return root, first, second


def disc() -> bytes:
    return jpeg_bytes(synthetic_photo(0, 31337))


def test_build_saves_a_new_version_with_its_summary(two_versions):
    root, first, second = two_versions
    assert first != second and first.split(":")[0] == second.split(":")[0] == "extendserve-shapes"
    listed = bentoml("models", "list")
    assert first.split(":")[1][:10] in listed and second.split(":")[1][:10] in listed
    got = json.loads(bentoml("models", "get", "extendserve-shapes:latest", "-o", "json"))
    assert got["metadata"]["labels"] == 1000 and f"{got['name']}:{got['version']}" == second  # latest: the second
    assert json.loads(bentoml("models", "get", first, "-o", "json"))["metadata"]["labels"] == 1002
    manifest = json.loads((root / "shapes" / "manifest.json").read_text())
    assert json.loads(bentoml("models", "get", first, "-o", "json"))["metadata"]["model_sha256"] == manifest["model_sha256"]


def test_older_version_exported_imported_and_served_by_tag(two_versions, tmp_path):
    """`bentoml models export` here, `import` into another store, serve the older version by its tag."""
    _, first, _ = two_versions
    bentoml("models", "export", first, str(tmp_path / "shapes.bentomodel"))
    other = {"BENTOML_HOME": str(tmp_path / "other-home")}
    bentoml("models", "import", str(tmp_path / "shapes.bentomodel"), env=other)
    s = Server(None, tmp_path, EXTENDSERVE_MODEL=first, **other)
    try:
        info = json.loads(s.get("/info")[1])
        assert info["model_tag"] == first and info["model_version"] == first.split(":")[1] and len(info["labels"]) == 1002
        status, body = s.post("/classify", [("image", disc(), "d.jpg")])
        assert status == 200 and body["predictions"][0]["label"] == "red discs"
    finally:
        s.stop()


def test_missing_tag_stops_start_up_with_the_fix(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bentoml", "serve", "--port", "0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=os.environ | {"EXTENDSERVE_MODEL": "extendserve-nothing:latest"})
    assert r.returncode == 2 and "no model extendserve-nothing:latest" in r.stderr and "extendserve build" in r.stderr


@pytest.mark.slow
def test_bento_built_here_serves_from_another_directory(two_versions, tmp_path):
    """`bentoml build` packs the tagged model by reference (no model files in the bento's source),
    and `bentoml serve extendserve-classifier:latest` from elsewhere serves that model."""
    _, first, second = two_versions
    out = bentoml("build", env={"EXTENDSERVE_MODEL": first})
    bento = re.search(r"(extendserve-classifier:\w+)", out).group(1)
    info = json.loads(bentoml("get", bento, "-o", "json"))
    packed = [m["tag"] for svc in info["services"] for m in svc["models"]]
    assert packed == [first]
    store = Path(os.environ["BENTOML_HOME"]) / "bentos" / "extendserve-classifier" / bento.split(":")[1]
    assert not list((store / "src").rglob("*.onnx"))  # by reference, not copied in as source
    # the GPU bento: onnxruntime-gpu pinned to the CUDA major its docs and errors name (13)
    env = store / "env" / "python"
    assert "onnxruntime-gpu[cuda,cudnn]>=1.27,<2" in (env / "requirements.in").read_text()
    locked = (env / "requirements.txt").read_text()  # BentoML locks the versions at build time
    assert re.search(r"^nvidia-cuda-runtime==13\.", locked, re.M) and "nvidia-cudnn-cu13==9." in locked
    assert "CUDA 13" in (ROOT / "bentofile.yaml").read_text() and "CUDA 12 and" not in (ROOT / "README.md").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The bento wins: EXTENDSERVE_MODEL left in the shell once made it serve that model instead.
    s = Server(None, tmp_path, target=bento, cwd=elsewhere, EXTENDSERVE_MODEL=second)
    try:
        assert json.loads(s.get("/info")[1])["model_tag"] == first
        assert f"EXTENDSERVE_MODEL={second} is ignored" in s.logs()
        status, body = s.post("/classify", [("image", disc(), "d.jpg")])
        assert status == 200 and body["predictions"][0]["label"] == "red discs"
    finally:
        s.stop()


def test_cpu_bento_carries_no_cuda_and_describes_the_service(two_versions):
    """bentofile.cpu.yaml: onnxruntime's CPU build, no CUDA or cuDNN wheels; the bento's description
    (its Swagger page's) is the service's own, not BentoML's generic text."""
    _, first, _ = two_versions
    out = bentoml("build", "-f", "bentofile.cpu.yaml", env={"EXTENDSERVE_MODEL": first})
    bento = re.search(r"(extendserve-classifier:\w+)", out).group(1)
    store = Path(os.environ["BENTOML_HOME"]) / "bentos" / "extendserve-classifier" / bento.split(":")[1]
    env = store / "env" / "python"
    assert "onnxruntime>=1.20" in (env / "requirements.in").read_text()
    locked = (env / "requirements.txt").read_text()  # BentoML locks the versions at build time
    assert re.search(r"^onnxruntime==", locked, re.M) and "onnxruntime-gpu" not in locked
    assert not re.search(r"^nvidia-(cuda|cudnn|cublas|cufft|curand|nvjitlink)", locked, re.M)  # nvidia-ml-py is BentoML's
    readme = (store / "README.md").read_text()
    assert "extendserve: an ImageNet classifier" in readme and "created with BentoML" not in readme


def test_half_saved_version_is_removed_and_latest_names_a_whole_one(two_versions):
    """A save killed half-way (BentoML copies a version into place file by file) once left a version
    with a quarter of its model.onnx, listed as the newest, and `latest` named it once the good one
    was deleted. Such a version is now removed at the next save or service start."""
    import shutil

    _, first, second = two_versions
    store = Path(os.environ["BENTOML_HOME"]) / "models" / "extendserve-shapes"
    half = store / "zzhalfsaved"
    shutil.copytree(store / second.split(":")[1], half)
    data = (half / "model.onnx").read_bytes()
    (half / "model.onnx").write_bytes(data[: len(data) // 4])
    for f in half.iterdir():  # killed ten minutes ago (a version written a moment ago may be a save in progress)
        os.utime(f, (time.time() - 600, time.time() - 600))
    (store / "latest").write_text(half.name)  # as after `bentoml models delete` of the whole one
    r = subprocess.run([sys.executable, "-c", "from extendserve.building.store import resolve; "
                        "print(resolve('extendserve-shapes:latest')[0])"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == second and not half.exists()
    assert "removed extendserve-shapes:zzhalfsaved" in r.stderr and "half-saved" in r.stderr
    assert "zzhalfsaved" not in bentoml("models", "list")
