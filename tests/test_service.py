"""A real `bentoml serve` on a free port, spoken to over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import IMAGENET_SAMPLE, ROOT, bomb_png, header_only_jpeg, jpeg_bytes, synthetic_photo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(fields: list[tuple[str, str | bytes, str | None]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value, filename in fields:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if filename is not None:
            head += f'; filename="{filename}"\r\nContent-Type: application/octet-stream'
        data = value.encode() if isinstance(value, str) else value
        parts.append(head.encode() + b"\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    def __init__(self, model_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"EXTENDSERVE_MODEL_DIR": str(model_dir), "EXTENDSERVE_DEVICE": "auto",
                            "EXTENDSERVE_MAX_UPLOAD_MB": "2",
                            "BENTOML_HOME": str(model_dir.parent / "bentoml-home")}
        self.log = open(model_dir.parent / "serve.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--port", str(self.port)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("bentoml serve exited:\n" + self.logs())
            try:
                if urllib.request.urlopen(self.url + "/readyz", timeout=2).status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError("bentoml serve did not become ready:\n" + self.logs())

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def post(self, path: str, fields) -> tuple[int, object]:
        body, ctype = multipart(fields)
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": ctype}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read()

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="module")
def server(built_model):
    s = Server(built_model)
    yield s
    s.stop()


def disc() -> bytes:
    return jpeg_bytes(synthetic_photo(0, 31337))


def test_classify(server):
    status, body = server.post("/classify", [("image", disc(), "disc.jpg"), ("top_k", "3", None)])
    assert status == 200, body
    preds = body["predictions"]
    assert len(preds) == 3 and preds[0]["label"] == "red discs" and preds[0]["head"] == "shapes"
    assert set(preds[0]) == {"label", "index", "score", "head"}


def test_classify_matches_cli_predict(server, built_model, tmp_path):
    from conftest import run_cli

    (tmp_path / "d.jpg").write_bytes(disc())
    cli = json.loads(run_cli("predict", "--model", str(built_model), "--json", str(tmp_path / "d.jpg")).stdout)
    _, body = server.post("/classify", [("image", disc(), "d.jpg")])
    assert [p["index"] for p in body["predictions"]] == [p["index"] for p in cli[0]["predictions"]]
    assert abs(body["predictions"][0]["score"] - cli[0]["predictions"][0]["score"]) < 1e-5


def test_classify_batch_in_order(server):
    stripes = jpeg_bytes(synthetic_photo(1, 4040))
    status, body = server.post("/classify_batch", [("images", disc(), "a.jpg"), ("images", stripes, "b.jpg"),
                                                   ("images", disc(), "c.jpg")])
    assert status == 200, body
    assert [b["predictions"][0]["label"] for b in body] == ["red discs", "blue stripes", "red discs"]


@pytest.mark.parametrize("data", [b"", b"garbage bytes", bytes(range(256)) * 64, b"<html></html>",
                                  b"%PDF-1.5 hello", "truncated", "header-only", "bomb"])
def test_bad_photos_are_400_json(server, data):
    if data == "truncated":
        data = disc()[: len(disc()) // 2]
    elif data == "header-only":
        data = header_only_jpeg()
    elif data == "bomb":
        data = bomb_png()  # claims 30000 x 30000: refused from its header
    status, body = server.post("/classify", [("image", data, "x.jpg")])
    assert status == 400 and isinstance(body, dict) and body["error"]
    status, _ = server.post("/classify", [("image", disc(), "ok.jpg")])
    assert status == 200  # still serving


def test_upload_over_limit_is_413(server):
    big = disc() + b"\0" * (3 * 1024 * 1024)  # a valid JPEG with trailing bytes, over the 2 MB test limit
    status, body = server.post("/classify", [("image", big, "big.jpg")])
    assert status == 413 and "limit" in body["error"]


def test_bad_top_k_and_missing_field(server):
    status, body = server.post("/classify", [("image", disc(), "x.jpg"), ("top_k", "0", None)])
    assert status == 400 and "top_k" in body["error"]
    status, body = server.post("/classify", [("top_k", "3", None)])  # no photo at all
    assert status == 400 and "image" in json.dumps(body)


def test_info_and_bentoml_endpoints(server):
    status, raw = server.get("/info")
    info = json.loads(raw)
    assert status == 200 and len(info["labels"]) == 1002 and info["heads"][1]["name"] == "shapes"
    assert info["device"] in ("cpu", "cuda") and "CPUExecutionProvider" in info["providers"]
    assert info["verification"]["passed"] and info["preprocess"]["crop"] == 224
    assert {"onnxruntime", "bentoml", "extendserve"} <= set(info["versions"])
    for path in ("/healthz", "/livez", "/readyz", "/metrics", "/docs.json"):
        assert server.get(path)[0] == 200


def test_concurrent_requests_are_batched(server):
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: server.post("/classify", [("image", disc(), "d.jpg")]), range(48)))
    assert all(s == 200 and b["predictions"][0]["label"] == "red discs" for s, b in results)


def test_no_torch_in_service(server):
    src = (ROOT / "service" / "service.py").read_text()
    assert "import torch" not in src
    code = "import sys; sys.path.insert(0, '.'); import service.service; assert 'torch' not in sys.modules; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.skipif(not IMAGENET_SAMPLE.is_dir(), reason="../shared/data is absent")
def test_real_photo(server):
    status, body = server.post("/classify", [("image", (IMAGENET_SAMPLE / "n01440764_tench.JPEG").read_bytes(), "t.jpg")])
    assert status == 200 and body["predictions"][0]["label"] == "tench"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make browser)")
def test_ui_page_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "disc.jpg"
    photo.write_bytes(disc())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto(server.url + "/ui")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("tr.prediction", timeout=30000)
        rows = page.locator("tr.prediction")
        assert rows.count() == 5
        assert rows.nth(0).locator(".label").inner_text() == "red discs"
        assert rows.nth(0).locator(".head").inner_text() == "shapes"
        assert page.locator("#photo").is_visible()
        assert "1002 classes" in page.locator("#meta").inner_text()
        page.screenshot(path=str(tmp_path / "ui.png"))
        browser.close()
