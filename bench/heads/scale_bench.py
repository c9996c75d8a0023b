"""Scale: train-head and the merged model at 10, 100 and 1000 classes, 100 to 5000 photos.

For each case, photos are laid out as class folders (links to JPEGs made once from the shared
photos: crops and flips of the ImageNet sample, garments, hand signs and faces, so every file is
a distinct photo), then, each in a fresh process as a user runs it:
- ``extendserve train-head`` (defaults): wall time and the process's peak memory (ru_maxrss);
  the first case that sees a photo pays its feature extraction, later cases read the cache, so the
  table says how many features were extracted;
- ``extendserve build``; then the merged model's throughput against the plain base model at batch
  16, both onnxruntime CPU sessions, measured alternately in one process.

Usage: python bench/heads/scale_bench.py [--cases 10x100,100x1000,1000x1000,16x3249,1000x5000] [--keep DIR]
Without ../shared the photos are generated scenes (the figures then say so).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import ROOT, SHARED, generated, write_section  # noqa: E402

DEFAULT_CASES = "10x100,100x1000,1000x1000,16x3249,10x5000"


def source_photos() -> list[bytes]:
    if not SHARED.is_dir():
        return generated(200, (500, 375))
    files = sorted(p for p in SHARED.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    return [p.read_bytes() for p in files]


def make_photos(folder: Path, count: int) -> list[Path]:
    """``count`` distinct JPEGs: each source photo, then crops and flips of it (made once, reused)."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("*.jpg"))
    if len(have) >= count:
        return have[:count]
    src = source_photos()
    out = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        out.append(path)
        if path.exists():
            continue
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(src[i % len(src)]))).convert("RGB")
        v = i // len(src)  # 0: as it is; then a crop (one of four corners, 80%) and a flip every other
        if v:
            w, h = img.size
            cw, ch = int(w * 0.8), int(h * 0.8)
            x0, y0 = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)][v % 4]
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            if (v // 4) % 2 == 0:
                img = ImageOps.mirror(img)
        img.save(path, "JPEG", quality=90)
    return out


def layout(folder: Path, photos: list[Path], classes: int) -> None:
    """Class folders of links: photo i in class i mod ``classes``."""
    shutil.rmtree(folder, ignore_errors=True)
    for i, p in enumerate(photos):
        d = folder / f"class {i % classes:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).symlink_to(p)


def run_peak(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds, peak MB, stderr) of ``extendserve ARGS`` in a fresh process: that child's own
    rusage from wait4, not the maximum over all children."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "extendserve", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []

    def drain(stream, into):  # type: ignore[no-untyped-def]
        for chunk in iter(lambda: stream.read(65536), b""):
            into.append(chunk)

    threads = [threading.Thread(target=drain, args=(proc.stdout, out_chunks)),
               threading.Thread(target=drain, args=(proc.stderr, err_chunks))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    err = b"".join(err_chunks).decode("utf-8", "replace")
    if status:
        raise SystemExit(f"extendserve {' '.join(args)} failed:\n{b''.join(out_chunks).decode()}\n{err}")
    return seconds, usage.ru_maxrss / 1024, err


def throughput(model_dir: Path, repeats: int) -> tuple[float, float]:
    """(merged, plain) photos/s at batch 16: single calls of the two interleaved (merged first on
    even rounds, plain first on odd), 40 rounds a repeat, the median call time of each. On this
    shared 2-core VM best-of-2-second-trials moved the same model's ratio from 0.86x to 1.06x between
    runs; interleaving single calls spreads the machine's slow spells over both."""
    import onnxruntime as ort

    from extendserve.bases.base import builtin_base
    from extendserve.bases.pretrained import load_backbone

    def session(graph: bytes) -> ort.InferenceSession:
        o = ort.SessionOptions()
        o.log_severity_level = 3
        return ort.InferenceSession(graph, o, providers=["CPUExecutionProvider"])

    merged = session((model_dir / "model.onnx").read_bytes())
    plain = session(builtin_base(load_backbone()).adapted(["logits"]).SerializeToString())
    x = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    calls = {"merged": lambda: merged.run(["logits"], {"pixels": x}), "plain": lambda: plain.run(None, {"pixels": x})}
    times: dict[str, list[float]] = {"merged": [], "plain": []}
    for fn in calls.values():
        fn()
    for i in range(40 * repeats):
        for name in (("merged", "plain") if i % 2 == 0 else ("plain", "merged")):
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return 16 / float(np.median(times["merged"])), 16 / float(np.median(times["plain"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=DEFAULT_CASES, help="CLASSESxPHOTOS, comma-separated")
    ap.add_argument("--keep", help="folder for the generated photos and the feature cache (kept between runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave docs/benchmarks.md alone")
    ap.add_argument("--ratio", nargs="+", metavar="MODEL_DIR", help="only the throughput of built models against the "
                                                                 "plain one (no training), printed")
    a = ap.parse_args()
    if a.ratio:
        for d in a.ratio:
            merged, plain = throughput(Path(d), a.repeats)
            print(f"{d}: merged {merged:.1f}, plain {plain:.1f} photos/s, ratio {merged / plain:.2f}x", flush=True)
        return
    cases = [tuple(int(x) for x in c.split("x")) for c in a.cases.split(",")]
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="extendserve-scale-"))
    env = os.environ | {"EXTENDSERVE_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT / "src")}
    photos = make_photos(work / "photos", max(p for _, p in cases))
    rows = ["| classes | photos | features extracted | train-head s | train-head peak MB | build s | "
            "merged photos/s | plain photos/s | ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for classes, count in cases:
        data, head, model = work / f"data-{classes}x{count}", work / f"h-{classes}x{count}.pt", work / f"m-{classes}x{count}"
        layout(data, photos[:count], classes)
        t_train, peak, err = run_peak(["train-head", str(data), "-o", str(head)], env)
        hits = re.findall(r"\((\d+) cached\)", err)
        extracted = count - int(hits[-1]) if hits else count
        shutil.rmtree(model, ignore_errors=True)
        t_build, _, _ = run_peak(["build", "--new-head", str(head), "-o", str(model), "--no-store"], env)
        merged, plain = throughput(model, a.repeats)
        rows.append(f"| {classes} | {count} | {extracted} | {t_train:.0f} | {peak:.0f} | {t_build:.0f} | "
                    f"{merged:.1f} | {plain:.1f} | {merged / plain:.2f}x |")
        print(rows[-1], flush=True)
    body = "\n".join(rows) + (
        "\n\nEach train-head and build is a fresh `extendserve` process with the default settings; peak MB is that "
        "process's maximum resident memory. Features are cached by photo content, so a case reuses what an earlier "
        "case extracted (the column says how many it extracted itself). Throughput: the merged model's `logits` "
        "against the plain base model, batch 16, median of single calls of the two interleaved, in one process.")
    print(body)
    if not a.no_write:
        write_section("scale", "Scale: classes and photos", f"python bench/heads/scale_bench.py --cases {a.cases}", body)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
