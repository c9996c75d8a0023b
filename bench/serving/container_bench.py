"""The images, as a cluster runs them: size, time from `run` to ready, and the first answers.

    python bench/serving/container_bench.py [--runs 3] [--image extendserve:cpu]

Runs the image read-only with a tmpfs /tmp, as the non-root user it declares, with host networking
(docker where a Docker engine answers, else podman with deploy/podman/containers.conf), waits for
/readyz, then times single /classify requests of a real photo. Rewrites its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys as _sys  # noqa: E402
import time
import urllib.error
import urllib.request
from pathlib import Path as _Path  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import ROOT, SAMPLE, write_section


def engine() -> str:
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
    return "podman"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def size_mb(eng: str, image: str) -> float:
    out = subprocess.run([eng, "image", "inspect", image, "--format", "{{.Size}}"], capture_output=True, text=True)
    return float(out.stdout.strip() or 0) / 1e6


def one_run(eng: str, image: str, photo: bytes, requests: int = 20) -> tuple[float, float, list[float], str]:
    port = free_port()
    name = f"extendserve-bench-{port}"
    t0 = time.time()
    subprocess.run([eng, "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
                    "-e", f"BENTOML_PORT={port}", image], check=True, capture_output=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
            if time.time() - t0 > 300:
                raise RuntimeError("not ready in 300 s")
        ready = time.time() - t0
        times, label = [], ""
        for _ in range(requests + 1):
            req = urllib.request.Request(url + "/classify", data=photo, method="POST", headers={"Content-Type": "image/jpeg"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as r:
                label = json.loads(r.read())["predictions"][0]["label"]
            times.append((time.perf_counter() - t) * 1000)
        return ready, times[0], times[1:], label
    finally:
        subprocess.run([eng, "rm", "-f", name], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--image", action="append", help="default: extendserve:cpu and extendserve:gpu where built")
    a = ap.parse_args()
    eng = engine()
    images = a.image or [i for i in ("extendserve:cpu", "extendserve:gpu") if size_mb(eng, i) > 0]
    photo = (SAMPLE / "n01440764_tench.JPEG").read_bytes()
    rows = []
    for image in images:
        runs = [one_run(eng, image, photo) for _ in range(a.runs)]
        readies = [r[0] for r in runs]
        warm = [t for r in runs for t in r[2]]
        rows.append(f"| `{image}` | {size_mb(eng, image):.0f} | {min(readies):.1f} / {statistics.median(readies):.1f} / "
                    f"{max(readies):.1f} | {statistics.median([r[1] for r in runs]):.0f} | {statistics.median(warm):.0f} | "
                    f"{runs[0][3]} |")
        print(rows[-1])
    body = ("| image | size (MB) | `run` to ready, s (min / median / max) | first /classify (ms) | "
            "then, median (ms) | tench named |\n|---|---|---|---|---|---|\n" + "\n".join(rows) +
            f"\n\n{a.runs} runs each with {eng}, `--read-only --tmpfs /tmp --network host`, on the CPU (no GPU here: "
            "the GPU image serves on the CPU as it does on a machine without one).")
    write_section("container", "Container images", f"python bench/serving/container_bench.py --runs {a.runs}", body)


if __name__ == "__main__":
    main()
