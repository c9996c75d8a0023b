"""train-head and build wall times, cold and warm feature cache, through the real CLI.

Cold: an empty feature cache (every photo decoded, 12 views run through the backbone, and the
feature graph exported once). Warm: the same photos again (cache hits by file content).
Photos: ../shared/data/celebs/train when present, else 2 classes of 20 generated photos.
Usage: python bench/training/train_build_bench.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import SHARED, generated, write_section  # noqa: E402


def cli(env: dict[str, str], *args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "extendserve", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"extendserve {' '.join(args)} failed:\n{r.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        celebs = SHARED / "celebs" / "train"
        if celebs.is_dir():
            data, what = celebs, f"the {sum(1 for _ in celebs.rglob('*.jpg'))} shared celebrity photos (5 classes)"
        else:
            data, what = t / "photos", "2 classes x 20 generated 500x375 JPEGs (../shared absent)"
            for c in range(2):
                (data / f"class{c}").mkdir(parents=True)
                for i, b in enumerate(generated(20, (500, 375), seed=c)):
                    (data / f"class{c}" / f"{i}.jpg").write_bytes(b)
        env = os.environ | {"EXTENDSERVE_CACHE": str(t / "cache")}
        rows = [("train-head, cold cache", cli(env, "train-head", str(data), "-o", str(t / "h.pt"))),
                ("train-head, warm cache", cli(env, "train-head", str(data), "-o", str(t / "h.pt"))),
                ("build (merge, export, verify, publish)", cli(env, "build", "--new-head", str(t / "h.pt"), "-o", str(t / "m"))),
                ("build again over the same dir", cli(env, "build", "--new-head", str(t / "h.pt"), "-o", str(t / "m")))]
    lines = [f"Photos: {what}; default settings (held-out check, strangers, suspicious photos and the final head).", "",
             "| command | wall seconds |", "| --- | --- |"] + [f"| {n} | {s:.1f} |" for n, s in rows]
    print("\n".join(lines))
    write_section("train-build", "train-head and build times", "python bench/training/train_build_bench.py", "\n".join(lines))


if __name__ == "__main__":
    main()
