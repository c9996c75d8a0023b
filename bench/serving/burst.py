"""A burst against a real ``bentoml serve``: 1500 requests, 48 at once, every kind of bad input
mixed in. No good request may fail, every bad one must be a 4xx with a JSON ``error``, and the
service's memory (all its processes) must stay flat. Exits non-zero if any of that breaks.

Usage: python bench/serving/burst.py [--model models/default] [--requests 1500] [--concurrency 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # conftest.py
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

from http_bench import serving  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import photos, write_section  # noqa: E402


def bad_inputs() -> dict[str, bytes]:
    from conftest import bomb_png, header_only_jpeg

    good = photos(1)[0][0]
    return {"empty": b"", "random bytes": bytes(range(256)) * 40, "html": b"<html><body>hi</body></html>",
            "pdf": b"%PDF-1.5\n1 0 obj", "truncated jpeg": good[: len(good) // 2], "header-only jpeg": header_only_jpeg(),
            "decompression bomb": bomb_png()}


def post(url: str, body: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    payload = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/classify", data=payload, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except Exception as e:  # connection reset, timeout: a failure to report, not to hide
        return 0, {"error": repr(e)}


def rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    import subprocess

    out = subprocess.run(["ps", "-o", "pid=,ppid=,rss=", "-e"], capture_output=True, text=True).stdout.split("\n")
    procs = [tuple(map(int, line.split())) for line in out if line.strip()]
    tree, grew = {pid}, True
    while grew:
        grew = False
        for p, pp, _ in procs:
            if pp in tree and p not in tree:
                tree.add(p)
                grew = True
    return sum(r for p, _, r in procs if p in tree)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=1000,
                    help="requests before the memory baseline: onnxruntime's arena settles over the first ~1000")
    a = ap.parse_args()
    good, what = photos()
    bad = bad_inputs()
    kinds = list(bad)
    # Every 10th request is bad, cycling through the kinds.
    plan = [(kinds[(i // 10) % len(kinds)], bad[kinds[(i // 10) % len(kinds)]]) if i % 10 == 9 else ("good", good[i % len(good)])
            for i in range(a.requests)]
    with serving(a.model) as (url, pid):
        with ThreadPoolExecutor(a.concurrency) as pool:  # warm-up at full concurrency, then the baseline
            list(pool.map(lambda i: post(url, good[i % len(good)]), range(a.warmup)))
        rss = [rss_kb(pid)]
        t0 = time.perf_counter()
        results = []
        with ThreadPoolExecutor(a.concurrency) as pool:
            for chunk in range(0, len(plan), 300):
                results += list(pool.map(lambda p: (p[0], *post(url, p[1])), plan[chunk : chunk + 300]))
                rss.append(rss_kb(pid))
        seconds = time.perf_counter() - t0
        after = [post(url, good[0])[0] for _ in range(3)]
    good_fail = [r for r in results if r[0] == "good" and r[1] != 200]
    bad_wrong = [r for r in results if r[0] != "good" and not (400 <= r[1] < 500 and r[2].get("error"))]
    growth = (rss[-1] - rss[0]) / rss[0]
    ok = not good_fail and not bad_wrong and all(s == 200 for s in after) and growth < 0.10
    lines = [f"{a.requests} requests ({sum(k == 'good' for k, _ in plan)} good photos from {what}, "
             f"{sum(k != 'good' for k, _ in plan)} bad: {', '.join(kinds)}), {a.concurrency} at once, "
             f"in {seconds:.1f} s ({a.requests / seconds:.1f} requests/s).", "",
             f"- good requests failed: {len(good_fail)}",
             f"- bad requests not answered 4xx + JSON error: {len(bad_wrong)}",
             f"- service memory (all processes, MB) after {a.warmup} warm-up requests, then after each 300: "
             + ", ".join(f"{r / 1024:.0f}" for r in rss) + f" (growth over the burst: {growth:+.1%}; limit +10%)",
             f"- answers after the burst: {after}", f"- verdict: {'PASS' if ok else 'FAIL'}"]
    if good_fail or bad_wrong:
        lines.append(f"- first failures: {(good_fail + bad_wrong)[:3]}")
    print("\n".join(lines))
    write_section("burst", "Burst: 1500 requests, 48 at once, bad inputs mixed in",
                  "python bench/serving/burst.py (or make burst)", "\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
