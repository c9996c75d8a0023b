"""HTTP vs in-process, side by side in one run: photos/s and latency at 1, 4, 16, 64 clients,
then the service's knobs (batching window and size, workers) at 16 clients.

In-process reference: decode + resize + crop with Pillow, then model.onnx in batches of 16.
Usage: python bench/serving/http_bench.py [--model models/default] [--requests 400] [--no-variants]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import ROOT, photos, write_section  # noqa: E402


def in_process(model_dir: str, data: list[bytes], n: int) -> float:
    from extendserve.serving.runtime import Model

    m = Model(model_dir)
    m.run(np.stack([m.prepare(b) for b in data[:16]]))
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


@contextlib.contextmanager
def serving(model: str, extra_env: dict[str, str] | None = None, root: Path = ROOT) -> Iterator[tuple[str, int]]:
    """A real ``bentoml serve`` of the service in ``root`` (this checkout) on a free port: its URL and pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"EXTENDSERVE_MODEL_DIR": model} | (extra_env or {})
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--port", str(port)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"bentoml serve exited with {proc.returncode}")
                time.sleep(0.5)
        yield url, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def load(url: str, data: list[bytes], clients: int, n: int) -> tuple[float, float, float]:
    """photos/s, p50 ms, p99 ms for ``n`` single-photo requests from ``clients`` at once."""
    for b in data[: 2 * clients]:
        post(url + "/classify", b)  # warm-up at this concurrency
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = list(pool.map(lambda i: post(url + "/classify", data[i % len(data)]), range(n)))
    return n / (time.perf_counter() - t0), np.percentile(lat, 50) * 1000, np.percentile(lat, 99) * 1000


CORES = len(os.sched_getaffinity(0))
SHIPPED = min(CORES, 4)
VARIANTS = [  # label, environment; the first is what ships
    (f"shipped: {SHIPPED} workers x {max(1, CORES // SHIPPED)} onnxruntime threads, window 4 ms, batch up to 32", {}),
    (f"1 worker x {CORES} threads", {"EXTENDSERVE_WORKERS": "1"}),
    ("no batching (batch up to 1)", {"EXTENDSERVE_MAX_BATCH": "1"}),
    ("window 1 ms", {"EXTENDSERVE_BATCH_MS": "1"}),
    ("window 10 ms", {"EXTENDSERVE_BATCH_MS": "10"}),
    ("batch up to 8", {"EXTENDSERVE_MAX_BATCH": "8"}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--no-variants", action="store_true")
    a = ap.parse_args()
    data, what = photos()
    rows = []
    with serving(a.model) as (url, _):
        ref = in_process(a.model, data, a.requests)
        for clients in (1, 4, 16, 64):
            rows.append((clients, *load(url, data, clients, a.requests if clients > 1 else max(50, a.requests // 4))))
            print(rows[-1], flush=True)
    lines = [f"Photos: {what}. In-process reference (Pillow decode+resize+crop, model.onnx in batches of 16, "
             f"measured in the same run): **{ref:.1f} photos/s**", "",
             "| clients | photos/s | ratio to in-process | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c} | {r:.1f} | {r / ref:.2f} | {p50:.0f} | {p99:.0f} |" for c, r, p50, p99 in rows]
    if not a.no_variants:
        lines += ["", "### The service's knobs, 16 clients", "",
                  "| service setting | photos/s | ratio to in-process | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
        for label, env in VARIANTS:
            with serving(a.model, env) as (url, _):
                r, p50, p99 = load(url, data, 16, a.requests)
            lines.append(f"| {label} | {r:.1f} | {r / ref:.2f} | {p50:.0f} | {p99:.0f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    write_section("http", "HTTP service vs the same work in one process", "python bench/serving/http_bench.py",
                  "\n".join(lines))


if __name__ == "__main__":
    main()
