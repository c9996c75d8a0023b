"""Where a worker's memory goes: RSS after each import and step a worker takes, then onnxruntime's
arena and speed by the largest batch (each batch size in a fresh process, one thread, as a worker).

Usage: python bench/serving/worker_memory.py [--model models/default]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import ROOT, write_section  # noqa: E402

STEPS = r"""
import json, os, sys
def rss(): return int(open(f"/proc/{os.getpid()}/status").read().split("VmRSS:")[1].split()[0]) / 1024
out = [("Python", rss())]
import numpy, PIL.Image; out.append(("numpy, Pillow", rss()))
import onnxruntime; out.append(("onnxruntime", rss()))
import bentoml, fastapi; out.append(("BentoML, FastAPI", rss()))
from extendserve.serving.runtime import Model; out.append(("extendserve's serving path", rss()))
m = Model(sys.argv[1], threads=1, engine="onnxruntime"); out.append(("the model's onnxruntime session", rss()))
import numpy as np
m.probabilities(np.zeros((4, 224, 224, 3), np.uint8)); out.append(("warmed to batch 4", rss()))
import openvino; out.append(("+ OpenVINO imported (not in a worker that serves onnxruntime)", rss()))
print(json.dumps(out))
"""

ARENA = r"""
import json, os, sys, time
import numpy as np
from extendserve.serving.runtime import Model
def rss(): return int(open(f"/proc/{os.getpid()}/status").read().split("VmRSS:")[1].split()[0]) / 1024
b = int(sys.argv[2])
m = Model(sys.argv[1], threads=1, engine="onnxruntime")
x = np.random.default_rng(0).integers(0, 255, (b, 224, 224, 3), dtype=np.uint8)
m.probabilities(x)
best = 0.0
for _ in range(3):
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        m.probabilities(x); n += b
    best = max(best, n / (time.perf_counter() - t0))
print(json.dumps([rss(), best]))
"""


def run(code: str, *args: str) -> object:
    env = {"MALLOC_ARENA_MAX": "2", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=ROOT,
                       env=env | {"PYTHONPATH": str(ROOT / "src")})
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "default"))
    a = ap.parse_args()
    steps = run(STEPS, a.model)
    lines = ["| step | RSS MB | added |", "| --- | ---: | ---: |"]
    prev = 0.0
    for name, mb in steps:
        lines.append(f"| {name} | {mb:.0f} | {mb - prev:+.0f} |")
        prev = mb
    lines += ["", "| largest batch | RSS after, MB | photos/s (1 thread) |", "| ---: | ---: | ---: |"]
    for b in (1, 4, 8, 16, 32):
        rss, rate = run(ARENA, a.model, str(b))
        lines.append(f"| {b} | {rss:.0f} | {rate:.0f} |")
    body = "\n".join(lines) + ("\n\nOne process, as a worker is (MALLOC_ARENA_MAX=2, one onnxruntime thread); the model "
                               f"is {Path(a.model, 'model.onnx').stat().st_size / 2**20:.0f} MB. The CPU default batch is 4.")
    print(body)
    write_section("worker_memory", "Where a worker's memory goes", "python bench/serving/worker_memory.py", body)


if __name__ == "__main__":
    main()
