"""A pod's worst clients and worst days, against a real `bentoml serve`: every byte a request holds
comes out of one budget per worker, a dead worker is replaced (or the pod stops being live), and
the Prometheus series do not grow with what clients send."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import pytest

from conftest import wait_for
from test_service import Server, disc

MB = 2**20


@pytest.fixture(scope="module")
def pod(built_model, tmp_path_factory):
    # One worker with a small budget, so that a handful of requests reach it.
    s = Server(built_model, tmp_path_factory.mktemp("pod"), EXTENDSERVE_WORKERS="1", EXTENDSERVE_MAX_BUFFERED_MB="160",
               EXTENDSERVE_MAX_UPLOAD_MB="24", EXTENDSERVE_MAX_REQUEST_MB="100", EXTENDSERVE_ENGINE="onnxruntime")
    yield s
    s.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def post_raw(s: Server, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    req = urllib.request.Request(s.url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=180) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


@pytest.mark.parametrize("kind", ["empty strings", "AAAA strings", "pixels as JSON numbers"])
def test_json_floods_are_refused_before_they_are_parsed(pod, built_model, kind):
    """250 MB of "" elements once blocked a worker for 24 s and took it from 675 to 2511 MB; 64 MB of
    "AAAA" elements +1.3 GB. Now the values are counted before parsing: more than the rows could need,
    or more than the budget could parse, is a 413 at once; the worker's memory grows by the body only."""
    (worker,) = pod.workers()
    before = rss_mb(worker)
    if kind == "empty strings":
        inp = b'{"name":"image","datatype":"BYTES","shape":[1],"data":[' + b'"",' * 6_000_000 + b'""]}'
    elif kind == "AAAA strings":
        inp = b'{"name":"image","datatype":"BYTES","shape":[1],"data":[' + b'"AAAA",' * 3_000_000 + b'"AAAA"]}'
    else:
        inp = b'{"name":"pixels","datatype":"UINT8","shape":[200,224,224,3],"data":[' + b"0," * 12_000_000 + b"0]}"
    body = b'{"inputs":[' + inp + b"]}"
    status, answer, _ = post_raw(pod, f"/v2/models/{built_model.name}/infer", body, {"Content-Type": "application/json"})
    assert status == 413 and ("values" in answer["error"] or "binary tensor data" in answer["error"]), (status, answer)
    assert pod.get("/livez")[0] == 200
    assert rss_mb(worker) - before < 3 * len(body) / MB + 40, (before, rss_mb(worker))
    assert pod.workers() == [worker]


def test_binary_elements_are_counted_as_they_are_read(pod, built_model):
    """A binary BYTES tensor of a million empty elements: refused past the row limit, not walked whole."""
    data = b"\0\0\0\0" * 1_000_000
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1_000_000],
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    status, answer, _ = post_raw(pod, f"/v2/models/{built_model.name}/infer", head + data,
                                 {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})
    assert status == 413 and "EXTENDSERVE_MAX_BATCH_PHOTOS" in answer["error"], answer


def batch_body(parts: int, size: int) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    one = os.urandom(size)
    body = b"".join(f'--{b}\r\nContent-Disposition: form-data; name="images"; filename="{i}.jpg"\r\n\r\n'.encode() + one
                    + b"\r\n" for i in range(parts)) + f"--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def test_bodies_held_count_against_one_budget(pod):
    """Legal bodies within every size limit, sent at once: past the worker's budget the rest are
    refused at once (503, Retry-After), none is a 500, the worker lives, and every byte comes back."""
    (worker,) = pod.workers()
    body, ctype = batch_body(3, 20 * MB)  # 60 MB: under the 100 MB request limit; three are over the 160 MB budget
    results: list[tuple[int, dict, dict]] = []

    def send() -> None:
        results.append(post_raw(pod, "/classify_batch", body, {"Content-Type": ctype}))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4  # every client reads its answer, refused ones included (no reset connection)
    statuses = sorted(r[0] for r in results)
    assert set(statuses) <= {400, 503} and 503 in statuses, statuses  # 400: random bytes are not photos
    refused = next(r for r in results if r[0] == 503)
    assert refused[2].get("retry-after") == "1" and "EXTENDSERVE_MAX_BUFFERED_MB" in refused[1]["error"], refused
    assert pod.workers() == [worker]
    wait_for("every byte given back (/info memory.held_bytes 0)", lambda: (pod.info()["memory"]["held_bytes"] == 0,
                                                                          pod.info()["memory"]))
    assert pod.info()["memory"]["refused"] >= 1


def flat_png(width: int, height: int, mode: str) -> bytes:
    """A flat-colour PNG (a few hundred KB for 64 megapixels), written a row at a time."""
    channels, colour = {"RGB": (3, 2), "L": (1, 0)}[mode]
    z = zlib.compressobj(9)
    row = b"\0" + b"\x80" * (width * channels)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_a_flat_64_megapixel_png_costs_what_the_budget_allows(pod):
    """A 261 KB flat PNG of 64 megapixels once cost 0.5-1.3 GB to decode, and four at once took a
    worker to 2431 MB. Its cost is now read from its header and taken from the budget first: an RGB
    one (320 MB to decode) is over this worker's whole 160 MB budget, a 413 that says what to do; a
    greyscale one fits, is answered, and the memory goes back after /classify."""
    (worker,) = pod.workers()
    rgb = flat_png(8000, 8000, "RGB")
    status, answer, _ = post_raw(pod, "/classify", rgb, {"Content-Type": "image/png"})
    assert status == 413 and "budget" in answer["error"] and "JPEG" in answer["error"], answer
    before = rss_mb(worker)
    grey = flat_png(8000, 8000, "L")
    status, answer, _ = post_raw(pod, "/classify", grey, {"Content-Type": "image/png"})
    assert status == 200, answer
    after = rss_mb(worker)
    assert after - before < 40, (before, after)  # 80 MB decoded, given back


def test_metrics_do_not_grow_with_the_paths_clients_send(pod):
    """20,000 GETs of random paths took a worker from 608 to 1404 MB and /metrics to 94 MB: BentoML
    labelled requests with the raw path. Now every path no route takes shares one label."""
    before = pod.get("/metrics")[1]
    conn = http.client.HTTPConnection("127.0.0.1", pod.port, timeout=60)
    for i in range(5000):
        conn.request("GET", f"/{uuid.uuid4().hex}/{i}?x={i}")
        r = conn.getresponse()
        r.read()
        if r.getheader("connection") == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", pod.port, timeout=60)
    conn.close()
    after = pod.get("/metrics")[1].decode()
    assert len(after) < len(before) + 20_000, (len(before), len(after))
    assert 'endpoint="other"' in after and "/0?" not in after and uuid.UUID(int=0).hex not in after


def test_a_killed_worker_is_replaced_as_the_image_runs(built_model, tmp_path):
    """In the image BentoML runs with BENTOML_CONTAINERIZED=true, where circus does not respawn: a
    worker killed by the memory cgroup left the pod at half capacity, or not ready, for good. Now it
    is replaced and warmed, and readiness counts live workers, never a zombie."""
    s = Server(built_model, tmp_path, EXTENDSERVE_WORKERS="2", BENTOML_CONTAINERIZED="true",
               EXTENDSERVE_ENGINE="onnxruntime")
    try:
        victim = s.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for("the killed worker replaced and both workers warm (/readyz 200)",
                 lambda: (victim not in s.workers() and len(s.workers()) == 2 and s.ready(), s.workers()))
        assert {s.info()["workers"]["warm"] for _ in range(8)} == {2}
        assert s.post("/classify", [("image", disc(), "d.jpg")])[0] == 200
        assert s.get("/livez")[0] == 200
        # the series count live workers: the dead one's budget is not summed with its replacement's
        text = s.get("/metrics")[1].decode()
        metrics = dict(re.findall(r"^(extendserve_(?:workers_ready|memory_budget_bytes)) (\S+)$", text, re.M))
        assert float(metrics["extendserve_workers_ready"]) == 2, metrics
        assert float(metrics["extendserve_memory_budget_bytes"]) == 2 * s.info()["memory"]["budget_bytes"], metrics
    finally:
        s.stop()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"extendserve-ready-*/{victim}"))


def test_readiness_never_counts_a_zombie_and_a_missing_worker_is_dated(tmp_path, monkeypatch):
    """A worker that died and was not yet reaped (a zombie) answers kill(pid, 0): it is not warm.
    Its mark becomes dead-<pid>, dated when first seen dead, until a replacement marks itself."""
    from extendserve.serving.readiness import READY_ENV, ReadyMarks, _alive

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for("the child to exit (a zombie until reaped)",
             lambda: Path(f"/proc/{zombie.pid}/stat").read_text().split(")")[1].split()[0] == "Z")
    assert not _alive(str(zombie.pid)) and _alive(str(os.getpid()))
    monkeypatch.setenv(READY_ENV, str(tmp_path))
    marks = ReadyMarks.for_service()
    (tmp_path / str(zombie.pid)).touch()
    marks.mark()  # this process: one live worker
    assert marks.count() == 1 and not marks.all(2)
    assert (tmp_path / f"dead-{zombie.pid}").exists()
    assert 0 <= marks.missing_for(2) < 60
    os.utime(tmp_path / f"dead-{zombie.pid}", (0, 1000))  # long dead
    assert marks.missing_for(2) > 3600  # /livez fails past EXTENDSERVE_HEAL_S
    replacement = subprocess.Popen(["sleep", "600"])  # a live process marks itself, as a new worker does
    try:
        (tmp_path / str(replacement.pid)).touch()
        assert marks.count() == 2 and marks.missing_for(2) == 0 and not list(tmp_path.glob("dead-*"))
    finally:
        replacement.kill()
        replacement.wait()
        zombie.wait()
