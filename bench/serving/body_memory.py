"""One worker's memory for the largest body of each kind it accepts, a worker killed and replaced,
and /metrics after thousands of distinct paths: `bentoml serve` with one worker and its default
budget (the cgroup's, else 384 MB), each body sent alone, the worker's peak (VmHWM) and settled RSS.

Usage: python bench/serving/body_memory.py [--model models/default]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "serving"))
from common import ROOT, write_section  # noqa: E402
from test_service import Server  # noqa: E402

MB = 2**20


def status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", path, body=body, headers=headers)
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def form(field: str, parts: list[bytes]) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = b"".join(f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.jpg"\r\n\r\n'.encode() + p
                    + b"\r\n" for i, p in enumerate(parts)) + f"--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def flat_png(side: int, colour: int, channels: int) -> bytes:
    z = zlib.compressobj(9)
    row = b"\0" + b"\x80" * (side * channels)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "default"))
    a = ap.parse_args()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    s = Server(Path(a.model), log_dir, EXTENDSERVE_WORKERS="1", EXTENDSERVE_MAX_UPLOAD_MB="32",
               EXTENDSERVE_ENGINE="onnxruntime")
    try:
        info = s.info()
        budget, request = info["memory"]["budget_bytes"], info["memory"]["request_limit_bytes"]
        name = info["model_tag"].split(":")[0] if info["model_tag"] else Path(a.model).name
        one = os.urandom(31 * MB)
        n = max(1, (request - MB) // (31 * MB))
        part = os.urandom((request - MB) // n - 1024)
        b64 = __import__("base64").b64encode(os.urandom(int((request - MB) * 0.74))).decode()
        v2_json = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}).encode()
        blob = b"".join(struct.pack("<I", len(part)) + part for _ in range(n))
        head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [n],
                                       "parameters": {"binary_data_size": len(blob)}}]}).encode()
        cases = [
            ("/classify form, 31 MB", "/classify", *form("image", [one])),
            ("/classify raw body, 31 MB", "/classify", one, "image/jpeg"),
            (f"/classify_batch, {n} x {len(part) / MB:.0f} MB", "/classify_batch", *form("images", [part] * n)),
            (f"/v2 JSON, one {len(b64) / MB:.0f} MB base64 photo", f"/v2/models/{name}/infer", v2_json, "application/json"),
            (f"/v2 binary, {n} x {len(part) / MB:.0f} MB", f"/v2/models/{name}/infer", head + blob, "application/octet-stream"),
            ("flat 8000x8000 greyscale PNG", "/classify", flat_png(8000, 0, 1), "image/png"),
            ("flat 8000x8000 RGB PNG", "/classify", flat_png(8000, 2, 3), "image/png"),
        ]
        (worker,) = s.workers()
        lines = [f"Budget {budget / MB:.0f} MB ({info['memory']['budget_from']}), request limit {request / MB:.0f} MB.", "",
                 "| body | answer | RSS before MB | peak MB | settled MB |", "| --- | ---: | ---: | ---: | ---: |"]
        for label, path, body, ctype in cases:
            before = status(worker, "VmRSS")
            Path(f"/proc/{worker}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            headers = {"Content-Type": ctype}
            if path.endswith("/infer") and ctype == "application/octet-stream":
                headers["Inference-Header-Content-Length"] = str(len(head))
            code = post(s.port, path, body, headers)
            time.sleep(1)
            row = f"| {label} | {code} | {before:.0f} | {status(worker, 'VmHWM'):.0f} | {status(worker, 'VmRSS'):.0f} |"
            print(row, flush=True)
            lines.append(row)
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        for i in range(5000):
            c.request("GET", f"/{uuid.uuid4().hex}/{i}")
            c.getresponse().read()
        metrics = s.get("/metrics")[1]
        lines += ["", f"/metrics after 5,000 distinct random paths: {len(metrics) / 1024:.0f} KB, "
                      f"{metrics.count(b'endpoint=')} labelled lines."]
        t0 = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        while worker in s.workers() or len(s.workers()) < 1 or not s.ready():
            time.sleep(0.2)
        lines.append(f"A worker killed (SIGKILL): replaced and warm (/readyz 200) {time.monotonic() - t0:.1f} s later.")
    finally:
        s.stop()
    body_md = "\n".join(lines)
    print(body_md)
    write_section("body_memory", "One worker's memory for the largest body of each kind",
                  "python bench/serving/body_memory.py", body_md)


if __name__ == "__main__":
    main()
