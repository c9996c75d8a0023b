"""train-head's wall time against the goals of issue 41, through the real CLI, every check included.

Sets, built in a temporary folder from ../shared/data (links to the photos; where a class needs more
photos than the shared set has, edited copies of its own photos: mirrored, cropped 10-20%, brighter
or darker, resized, re-encoded as JPEG):

- 4 x 40: four garment kinds (Shirt, T-Shirt, Pants, Shoes), their photos filled to 40 with edits;
- 10 x 20: the hand signs as they are;
- 50 x 20: 16 garment kinds, 9 of them again with their other photos as a second class of the same
  kind, the 10 hand signs, the 5 faces (filled to 20), and 10 classes of 20 consecutive ImageNet
  sample photos;
- a few hundred: the 462 garments (16 kinds) as they are;
- 3,000 x 16: the garments and edits of them, 3,000 photos.

Each set is run cold (an empty feature cache) and then cached. A fresh `extendserve` process each
time, so the wall time includes starting Python, torch and the base (about 2 s here: the 4 x 40 cached
run took 6.6 s, of which it printed 0.2 s of features and 4.5 s of training).
Usage: python bench/training/train_speed.py [--sets 4x40 10x20 50x20 few-hundred 3000x16]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import SAMPLE, SHARED, write_section  # noqa: E402

GOALS = {"4x40": (None, 10), "10x20": (None, 15), "50x20": (None, 60), "few-hundred": (60, None), "3000x16": (120, None)}


def photos_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def edited(src: Path, k: int) -> bytes:
    """The k-th edit of a photo: a different crop, mirror, brightness and size each time."""
    rng = np.random.default_rng(k)
    im = Image.open(src).convert("RGB")
    w, h = im.size
    cut = rng.uniform(0.1, 0.2)
    x0, y0 = int(rng.uniform(0, cut) * w), int(rng.uniform(0, cut) * h)
    im = im.crop((x0, y0, x0 + int(w * (1 - cut)), y0 + int(h * (1 - cut))))
    if k % 2:
        im = ImageOps.mirror(im)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.75, 1.25))
    im = im.resize((max(32, int(im.width * rng.uniform(0.7, 1.1))), max(32, int(im.height * rng.uniform(0.7, 1.1)))))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(75, 95)))
    return buf.getvalue()


def fill(out: Path, sources: list[Path], count: int, seed: int) -> None:
    """``count`` photos in ``out``: links to ``sources``, then edits of them."""
    out.mkdir(parents=True)
    for i, p in enumerate(sources[:count]):
        (out / f"{i}{p.suffix.lower()}").symlink_to(p)
    for i in range(len(sources), count):
        (out / f"edit{i}.jpg").write_bytes(edited(sources[i % len(sources)], seed * 100_000 + i))


def make(name: str, root: Path) -> Path:
    clothes, signs, celebs = SHARED / "clothes", SHARED / "signs", SHARED / "celebs" / "train"
    data = root / name
    if name == "4x40":
        for j, kind in enumerate(["Shirt", "T-Shirt", "Pants", "Shoes"]):
            fill(data / kind, photos_of(clothes / kind), 40, j)
    elif name == "10x20":
        for d in sorted(signs.iterdir()):
            fill(data / d.name, photos_of(d), 20, 0)
    elif name == "50x20":
        kinds = sorted(d for d in clothes.iterdir() if d.is_dir())
        for j, d in enumerate(kinds):
            fill(data / d.name, photos_of(d)[:20], 20, j)
            if j < 9:
                fill(data / f"{d.name} (2)", photos_of(d)[20:] or photos_of(d), 20, 50 + j)
        for d in sorted(signs.iterdir()):
            fill(data / d.name, photos_of(d), 20, 0)
        for j, d in enumerate(sorted(celebs.iterdir())):
            fill(data / d.name, photos_of(d), 20, 100 + j)
        sample = photos_of(SAMPLE)
        for j in range(10):
            fill(data / f"imagenet {j * 20}-{j * 20 + 19}", sample[j * 20 : (j + 1) * 20], 20, 200 + j)
    elif name == "few-hundred":
        for d in sorted(x for x in clothes.iterdir() if x.is_dir()):
            fill(data / d.name, photos_of(d), len(photos_of(d)), 0)
    elif name == "3000x16":
        kinds = sorted(x for x in clothes.iterdir() if x.is_dir())
        for j, d in enumerate(kinds):
            fill(data / d.name, photos_of(d), 3000 // len(kinds) + (j < 3000 % len(kinds)), 300 + j)
    return data


def train(data: Path, cache: Path, out: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "extendserve", "train-head", str(data), "-o", str(out)],
                       env=os.environ | {"EXTENDSERVE_CACHE": str(cache)}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"train-head {data} failed:\n{r.stderr[-3000:]}")
    said = re.search(r"features: ([\d.]+)s \((\d+)/(\d+) cached\); training: ([\d.]+)s", r.stdout)
    return wall, (f"features {said[1]} s, training {said[4]} s" if said else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=list(GOALS))
    a = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the shared photos")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in a.sets:
            data = make(name, root)
            n = sum(1 for p in data.rglob("*") if p.is_file() or p.is_symlink())
            classes = sum(1 for p in data.iterdir() if p.is_dir())
            cache = root / f"cache-{name}"
            cold = train(data, cache, root / f"{name}.pt")
            warm = train(data, cache, root / f"{name}.pt")
            goal_cold, goal_warm = GOALS[name]
            rows.append(f"| {name} | {classes} x {n} | {cold[0]:.1f} ({cold[1]}) | {goal_cold or '-'} | "
                        f"{warm[0]:.1f} ({warm[1]}) | {goal_warm or '-'} |")
            print(rows[-1], flush=True)
    body = "\n".join(["Wall seconds of `extendserve train-head DATA -o H.pt` in a fresh process (Python, torch and the "
                      "base start included), every check run: held-out, background, strangers, suspicious photos, "
                      "copies. Cold: an empty feature cache; cached: the same photos again.", "",
                      "| set | classes x photos | cold s (its own split) | goal | cached s (its own split) | goal |",
                      "| --- | --- | --- | --- | --- | --- |", *rows])
    print(body)
    if set(a.sets) == set(GOALS):
        write_section("train_speed", "train-head against its goals", "python bench/training/train_speed.py", body)


if __name__ == "__main__":
    main()
