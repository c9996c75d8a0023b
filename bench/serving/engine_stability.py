"""Which CPU engine a service start picks, start after start, idle and with every core kept busy.

Each start measures the engines as `bentoml serve` does (extendserve.serving.served: one copy per
worker at once, in a short-lived child process). The same machine and model should get the same
engine every time (at least 9 of 10 under load), and the pick should never be the slower one by
more than the trials' spread.

Usage: python bench/serving/engine_stability.py [--model models/default] [--starts 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from extendserve.serving.served import _measured_engine  # noqa: E402

from common import ROOT, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "default"))
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    s = SimpleNamespace(device="cpu", workers=a.workers, threads=max(1, cores // a.workers))
    lines = ["| load | starts | onnxruntime | openvino | OpenVINO's measured gain (min .. max) | spread (max) |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for load in ("idle", "busy"):
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)] if load == "busy" else []
        try:
            reports = [_measured_engine(Path(a.model), s) for _ in range(a.starts)]
        finally:
            for b in burners:
                b.kill()
        picks = collections.Counter(r["engine"] for r in reports)
        gains = [r["photos_per_s"]["openvino"] / r["photos_per_s"]["onnxruntime"] - 1 for r in reports if "photos_per_s" in r]
        spread = max((r.get("spread", 0) for r in reports), default=0)
        row = (f"| {load} | {a.starts} | {picks['onnxruntime']} | {picks['openvino']} | "
               + (f"{min(gains):+.0%} .. {max(gains):+.0%}" if gains else "not measured") + f" | {spread:.0%} |")
        print(row, flush=True)
        lines.append(row)
    body = "\n".join(lines) + (f"\n\n{a.workers} workers, {s.threads} onnxruntime thread(s) each, the engines measured "
                               "as served: one copy per worker at once. Busy: a busy loop on every core.")
    write_section("engine_stability", "Which engine each start picks", "python bench/serving/engine_stability.py", body)


if __name__ == "__main__":
    main()
