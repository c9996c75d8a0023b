"""HTTP vs in-process, side by side in one run: photos/s and latency at 1, 4, 16, 64 clients.

In-process reference: decode + resize + crop with Pillow, then model.onnx in batches of 16.
Usage: python bench/http_bench.py [--model models/default] [--requests 400]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"


def photos() -> list[bytes]:
    if SAMPLE.is_dir():
        return [p.read_bytes() for p in sorted(SAMPLE.iterdir())]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(50):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def in_process(model_dir: str, data: list[bytes], n: int) -> float:
    from extendserve.runtime import Model

    m = Model(model_dir)
    t0 = time.perf_counter()
    for i in range(0, n, 16):
        x = np.stack([m.prepare(data[(i + j) % len(data)]) for j in range(min(16, n - i))])
        m.run(x)
    return n / (time.perf_counter() - t0)


def post(url: str, body: bytes) -> float:
    boundary = uuid.uuid4().hex
    payload = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
               f"Content-Type: image/jpeg\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=payload, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        assert r.status == 200
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--requests", type=int, default=400)
    a = ap.parse_args()
    data = photos()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"EXTENDSERVE_MODEL_DIR": a.model}
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        for b in data[:8]:
            post(url + "/classify", b)  # warm-up
        ref = in_process(a.model, data, a.requests)
        rows = []
        for clients in (1, 4, 16, 64):
            n = a.requests if clients > 1 else max(50, a.requests // 4)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                lat = list(pool.map(lambda i: post(url + "/classify", data[i % len(data)]), range(n)))
            rate = n / (time.perf_counter() - t0)
            rows.append((clients, rate, np.percentile(lat, 50) * 1000, np.percentile(lat, 99) * 1000))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
             f"In-process reference (Pillow decode+resize+crop, model.onnx batches of 16): {ref:.1f} photos/s", "",
             "| clients | photos/s | ratio to in-process | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c} | {r:.1f} | {r / ref:.2f} | {p50:.0f} | {p99:.0f} |" for c, r, p50, p99 in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
