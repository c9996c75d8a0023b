"""One client's big batch against everyone else's single photos: the latency of single /classify
requests while one /classify_batch of N photos is being served, side by side with the same
singles on an idle service, in one run.

Usage: python bench/serving/fairness.py [--model models/default] [--photos 1000] [--singles 30]
       [--service-root DIR]   # serve another checkout's service (to compare with an older one)
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

from http_bench import post, serving  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import ROOT, photos, write_section  # noqa: E402


def post_batch(url: str, bodies: list[bytes]) -> tuple[int, float]:
    boundary = uuid.uuid4().hex
    payload = b"".join((f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.jpg"\r\n'
                        "Content-Type: image/jpeg\r\n\r\n").encode() + b + b"\r\n" for i, b in enumerate(bodies))
    payload += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/classify_batch", data=payload, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
        return r.status, time.perf_counter() - t0


def singles(url: str, data: list[bytes], n: int, stop: threading.Event | None = None) -> list[float]:
    lat = []
    for i in range(n):
        if stop is not None and stop.is_set():
            break
        lat.append(post(url + "/classify", data[i % len(data)]))
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "default"))
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--singles", type=int, default=30)
    ap.add_argument("--service-root", default=str(ROOT))
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    a = ap.parse_args()
    data, what = photos()
    env = {"EXTENDSERVE_MAX_BATCH_PHOTOS": str(a.photos), "EXTENDSERVE_MAX_REQUEST_MB": "4096"}
    if a.service_root != str(ROOT):
        env["PYTHONPATH"] = str(Path(a.service_root) / "src")
    with serving(str(Path(a.model).absolute()), env, Path(a.service_root)) as (url, _):
        idle = singles(url, data, a.singles)
        batch = [data[i % len(data)] for i in range(a.photos)]
        stop = threading.Event()
        result: dict[str, object] = {}

        def big() -> None:
            result["status"], result["seconds"] = post_batch(url, batch)
            stop.set()

        t = threading.Thread(target=big)
        t.start()
        time.sleep(1.0)  # the batch is uploaded and being worked on
        busy = singles(url, data, a.singles, stop)
        t.join()
    ms = lambda xs, q: np.percentile(xs, q) * 1000 if xs else float("nan")  # noqa: E731
    rows = [
        "| single /classify | requests | p50 ms | p90 ms | max ms |",
        "| --- | --- | --- | --- | --- |",
        f"| idle service | {len(idle)} | {ms(idle, 50):.0f} | {ms(idle, 90):.0f} | {ms(idle, 100):.0f} |",
        f"| during one {a.photos}-photo /classify_batch | {len(busy)} | {ms(busy, 50):.0f} | {ms(busy, 90):.0f} | "
        f"{ms(busy, 100):.0f} |",
    ]
    body = "\n".join(rows) + (f"\n\nThe batch: HTTP {result.get('status')}, {result.get('seconds', 0):.1f} s; "
                              f"photos: {what}; service from {a.service_root}.")
    print(body)
    if not a.no_write:
        write_section("fairness", "One big batch and single requests",
                      f"python bench/serving/fairness.py --photos {a.photos} --singles {a.singles}", body)


if __name__ == "__main__":
    main()
