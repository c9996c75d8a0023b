"""What every benchmark shares: the machine's description, the photos, and docs/benchmarks.md.

Each script owns one section of docs/benchmarks.md (between ``<!-- bench:NAME -->`` markers) and
rewrites only that section, with the machine it ran on and the command that produced it.
"""

from __future__ import annotations

import io
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
SAMPLE = SHARED / "imagenet-sample"
DOC = ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(ROOT / "src"))

from extendserve.engines import cpu_model  # noqa: E402


def gpu_model() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> str:
    """One line: CPU, cores usable, GPU, and the versions that matter for the figures."""
    def v(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = gpu_model() or "no GPU"
    return (f"{cpu_model()}, {cores} cores usable; {gpu}; Python {platform.python_version()}, "
            f"onnxruntime-gpu {v('onnxruntime-gpu')}, torch {v('torch')}, bentoml {v('bentoml')}, "
            f"Pillow {v('pillow')}, numpy {v('numpy')}; {time.strftime('%Y-%m-%d')}")


def photos(limit: int | None = None) -> tuple[list[bytes], str]:
    """The shared ImageNet sample when present, else generated 500x375 JPEGs; and which it was."""
    if SAMPLE.is_dir():
        data = [p.read_bytes() for p in sorted(SAMPLE.iterdir())]
        return data[:limit] if limit else data, f"the {len(data)} photos of ../shared/data/imagenet-sample"
    return generated(limit or 50, (500, 375)), "generated 500x375 JPEGs (../shared absent)"


def generated(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """Smooth synthetic scenes saved as JPEG quality 90 (noise would make unusually large files)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        f = rng.uniform(2, 12, 3) / max(w, h)
        ph = rng.uniform(0, 6.3, 3)
        img = np.stack([np.sin(xx * f[c] * 6 + yy * f[(c + 1) % 3] * 4 + ph[c]) for c in range(3)], -1)
        img = (img * 100 + 128 + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_section(name: str, title: str, command: str, body: str) -> None:
    """Replace (or append) this script's section of docs/benchmarks.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.is_file() else (
        "# Benchmarks, measured\n\nEvery figure below comes from the command printed with it; "
        "`make bench` runs them all. Ratios are measured side by side in one run. Each section names "
        "the machine it ran on.\n")
    section = (f"<!-- bench:{name} -->\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}\n\n"
               f"{body.strip()}\n<!-- /bench:{name} -->")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    tmp = DOC.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, DOC)


def best_rate(fn, items: int, repeats: int = 3, min_seconds: float = 0.5) -> float:  # type: ignore[no-untyped-def]
    """Items per second: the best of ``repeats`` trials, each calling ``fn`` for at least
    ``min_seconds``, after one warm-up call."""
    fn()
    best = 0.0
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        best = max(best, calls * items / elapsed)
    return best


def torch_merged(loaded, heads):  # type: ignore[no-untyped-def]
    """The merged model in torch eager (uint8 pixels -> base logits | heads), for torch-side figures."""
    from extendserve.heads.scoring import TorchMerged

    return TorchMerged(loaded.model, loaded.spec.preprocess, heads).eval()
