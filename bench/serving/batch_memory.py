"""A worker's memory after several big batches at once: is it given back?

One worker serves a model folder; one batch warms it up, then six batches are sent at once:
64 2000x1500 PNGs each (9 MB each once decoded, a few KB as files), or with --imagenet 256 photos
of ../shared/data/imagenet-sample each (the issue's case). Prints the worker's resident memory
before and two seconds after. Usage:
python bench/serving/batch_memory.py MODEL_DIR [--runs 2] [--imagenet]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # conftest.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "serving"))  # test_service.py
from test_service import Server  # noqa: E402  (the tests' own `bentoml serve` wrapper)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def photos(n: int = 64) -> list[bytes]:
    yy, xx = np.mgrid[0:1500, 0:2000]
    out = []
    for i in range(n):
        a = np.stack([(xx * 255 // 2000 + i) % 256, yy * 255 // 1500, np.full_like(xx, 40 * (i % 5))], -1)
        buf = io.BytesIO()
        Image.fromarray(a.astype(np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--imagenet", action="store_true")
    a = ap.parse_args()
    if a.imagenet:
        sample = sorted((Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-sample").glob("*.JPEG"))
        batch = [("images", sample[i % len(sample)].read_bytes(), f"{i}.jpg") for i in range(256)]
    else:
        batch = [("images", p, f"{i}.png") for i, p in enumerate(photos())]
    for run in range(a.runs):
        s = Server(Path(a.model_dir), Path(tempfile.mkdtemp()), EXTENDSERVE_WORKERS="1",
                   EXTENDSERVE_MAX_BATCH_PHOTOS="300")
        try:
            (worker,) = s.workers()
            assert s.post("/classify_batch", batch)[0] == 200
            time.sleep(1)
            before = rss_mb(worker)
            with ThreadPoolExecutor(6) as ex:
                statuses = list(ex.map(lambda _: s.post("/classify_batch", batch)[0], range(6)))
            time.sleep(2)
            print(f"run {run + 1}: {statuses.count(200)}/6 batches answered, worker {before:.0f} MB before, "
                  f"{rss_mb(worker):.0f} MB after (+{rss_mb(worker) - before:.0f})", flush=True)
        finally:
            s.stop()


if __name__ == "__main__":
    main()
