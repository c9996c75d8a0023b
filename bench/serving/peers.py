"""extendserve against the servers a user would pick instead, side by side in one run.

The same plain model.onnx (ImageNet only, built here), the same 64 photos as multipart JPEGs, one
server at a time, each with 2 workers or replicas and 2 onnxruntime threads in all, 16 clients
(wrk, 2 threads) for 30 s each: extendserve (`bentoml serve`), the forty-line FastAPI + uvicorn +
onnxruntime app (bench/serving/peers/handwritten.py) and Ray Serve with @serve.batch
(bench/serving/peers/ray_app.py, run from .venv-peers: `python3 -m venv .venv-peers &&
.venv-peers/bin/pip install 'ray[serve]' onnxruntime pillow python-multipart`; skipped without it).
Memory: the RSS and PSS of every process of the server, summed, after the load. Top-1 of every photo
from every server, compared. In-process: decode + resize + crop + model in 2 threads, one
onnxruntime thread each, the reference for HTTP against in-process.

Usage: python bench/serving/peers.py [--seconds 30] [--clients 16] [--no-ray]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import ROOT, photos, write_section  # noqa: E402

HERE = Path(__file__).resolve().parent / "peers"
BIN = Path(sys.executable).parent
RAY_PY = ROOT / ".venv-peers" / "bin" / "python"
BOUNDARY = "peersbenchboundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(photo: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(port: int, photo: bytes) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/classify", data=body(photo), method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def top1(answer: dict) -> int:
    return answer["predictions"][0]["index"] if "predictions" in answer else answer["index"]


def tree(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo += [int(c) for c in children]
    return out


def memory_mb(pids: list[int]) -> tuple[float, float]:
    """Summed RSS and PSS (shared pages split between their processes) in MB."""
    rss = pss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def wait_ready(port: int, proc: subprocess.Popen, path: str = "/classify", photo: bytes | None = None,
               seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            post(port, photo or b"")
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise RuntimeError("the server did not answer")


def wait_warm(port: int, proc: subprocess.Popen, seconds: float = 300) -> None:  # type: ignore[type-arg]
    """extendserve's /readyz: 200 once every worker has loaded and warmed the model."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError("the server's workers did not all warm up")


def gone(group: int, seconds: float = 60) -> None:
    """Wait until no process of the server's group is left: a worker still exiting takes CPU from the next
    server's run (a first version measured the same server at 134-199 photos/s across runs)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)


@contextlib.contextmanager
def server(kind: str, model: Path, photo: bytes, log: Path) -> Iterator[tuple[int, list[int]]]:
    """One server, up and answering; yields its port and a function of its processes."""
    port = free_port()
    env = os.environ | {"MODEL": str(model / "model.onnx"), "PORT": str(port)}
    if kind.startswith("extendserve"):
        engine = "onnxruntime" if "onnxruntime" in kind else "auto"
        env |= {"EXTENDSERVE_MODEL_DIR": str(model), "EXTENDSERVE_WORKERS": "2", "EXTENDSERVE_ENGINE": engine,
                "EXTENDSERVE_DEVICE": "cpu"}
        cmd = [str(BIN / "bentoml"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        cwd = ROOT
    elif kind == "handwritten":
        cmd = [str(BIN / "uvicorn"), "handwritten:app", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
               "--log-level", "warning"]
        cwd = HERE
    else:
        cmd = [str(RAY_PY), "ray_app.py"]
        cwd = HERE
        env |= {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(port, proc, photo=photo)
            if kind.startswith("extendserve"):  # every worker warm, not only the first to answer
                wait_warm(port, proc)
            yield port, proc.pid
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            gone(proc.pid)
            if kind == "ray":
                subprocess.run([str(RAY_PY.parent / "ray"), "stop", "--force"], capture_output=True)


def wrk(port: int, bodies: Path, n: int, clients: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds}s", "--latency", "--timeout", "30s",
                          "-s", str(HERE / "load.lua"), f"http://127.0.0.1:{port}", "--", str(bodies), str(n)],
                         capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    done = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in errors.groups()) if errors else 0)
    return {"rate": done / seconds, "p50": ms("50%"), "p99": ms("99%"), "failed": failed}


def in_process(model: Path, data: list[bytes], seconds: float = 10.0) -> float:
    """Decode + preprocess + model in 2 threads of one process, one onnxruntime thread each, batch 8."""
    from extendserve.serving.runtime import Model

    m = Model(model, threads=1, engine="onnxruntime")
    chunks = [data[i : i + 8] for i in range(0, len(data), 8)]

    def work(k: int) -> int:
        n, t_end = 0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            batch = chunks[(k + n) % len(chunks)]
            m.probabilities(np.stack([m.prepare(b) for b in batch]))
            n += len(batch)
        return n

    m.probabilities(np.stack([m.prepare(b) for b in chunks[0]]))  # warm
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        total = sum(pool.map(work, range(2)))
    return total / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--only", nargs="*", help="servers to run (extendserve, extendserve-onnxruntime, handwritten, ray)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    data, source = photos(64)
    kinds = args.only or ["extendserve", "extendserve-onnxruntime", "handwritten", "ray"]
    if "ray" in kinds and (args.no_ray or not RAY_PY.exists()):
        kinds.remove("ray")
        print("Ray Serve skipped: no .venv-peers (see this script's docstring)")
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    model = work / "plain"
    subprocess.run([str(BIN / "extendserve"), "build", "-o", str(model), "--no-store"], check=True,
                   capture_output=True)
    bodies = work / "bodies"
    bodies.mkdir()
    for i, p in enumerate(data, 1):
        (bodies / f"{i}.body").write_bytes(body(p))
    rows, tops = [], {}
    for kind in kinds:
        with server(kind, model, data[0], work / f"{kind}.log") as (port, pid):
            tops[kind] = [top1(post(port, p)) for p in data]
            wrk(port, bodies, len(data), args.clients, 5)  # warm: every worker, every path
            r = wrk(port, bodies, len(data), args.clients, args.seconds)
            rss, pss = memory_mb(tree(pid))
            engine = ""
            if kind.startswith("extendserve"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=30) as f:
                    engine = json.loads(f.read())["engine"]["engine"]
        rows.append((kind, engine, r, rss, pss))
        print(f"{kind:26s} {engine:12s} {r['rate']:7.1f} photos/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms  "
              f"failed {r['failed']}  RSS {rss:6.0f} MB  PSS {pss:6.0f} MB", flush=True)
    rate_in = in_process(model, data)
    print(f"in-process (2 threads, batch 8): {rate_in:.1f} photos/s")
    same = len({tuple(t) for t in tops.values()}) == 1
    hand = next((r for k, _, r, _, _ in rows if k == "handwritten"), None)
    hand_rss = next((rss for k, _, _, rss, _ in rows if k == "handwritten"), None)
    lines = ["| server | engine | photos/s | vs hand-written | p50 ms | p99 ms | failed | RSS MB | PSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, engine, r, rss, pss in rows:
        ratio = f"{r['rate'] / hand['rate']:.2f}x" if hand else ""
        mem = f"{rss:.0f}" + (f" ({rss / hand_rss:.1f}x)" if hand_rss else "")
        lines.append(f"| {kind} | {engine or 'onnxruntime'} | {r['rate']:.1f} | {ratio} | {r['p50']:.0f} | {r['p99']:.0f} | "
                     f"{r['failed']} | {mem} | {pss:.0f} |")
    ext = next((r for k, _, r, _, _ in rows if k == "extendserve"), None)
    body_md = "\n".join(lines) + (
        f"\n\nIn-process (decode + model, 2 threads, batch 8): {rate_in:.1f} photos/s"
        + (f"; extendserve over HTTP: {ext['rate'] / rate_in:.2f} of it" if ext else "")
        + f". Same top-1 from every server on all {len(data)} photos: {'yes' if same else 'NO'}. "
        f"Photos: the first {len(data)} of {source}; "
        f"{args.clients} clients (wrk, 2 threads) for {args.seconds} s after a 5 s warm-up, one "
        "server at a time; 2 workers or replicas, 2 onnxruntime threads in all. Memory: every process of the "
        "server after the load (RSS summed; PSS splits shared pages).")
    print(body_md)
    write_section("peers", "Against the peers: extendserve, a hand-written FastAPI app, Ray Serve",
                  "python bench/serving/peers.py", body_md)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
