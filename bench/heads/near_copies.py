"""Near-copies against different photos: how alike the base's features say they are.

For each shared set (faces, hand signs, garments) a sample of photos is copied with the ordinary
edits (mirror, crop up to 20%, brightness and contrast, JPEG recompression, resize), one to all of
them at once, and the near-copy score of each (photo, its copy) pair is set against the score of
every pair of different photos of the set (same class and not). Two scores: the centre view alone
(train-head's copies check before, at 0.98), and the best over the centre, full and mirrored views
at the threshold the check now takes from the folder itself (heads.checks.copy_threshold).

Usage: python bench/heads/near_copies.py [--per-set 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from extendserve.heads.checks import copy_threshold, near_copy_scores  # noqa: E402

from common import SHARED, write_section  # noqa: E402

SETS = {"faces": SHARED / "celebs" / "train", "hand signs": SHARED / "signs", "garments": SHARED / "clothes"}


def edit(im: Image.Image, rng: np.random.Generator, which: list[str]) -> Image.Image:
    im = im.convert("RGB")
    if "mirror" in which:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "crop" in which:
        w, h = im.size
        k = rng.uniform(0.8, 0.92)
        cw, ch = int(w * k), int(h * k)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x, y, x + cw, y + ch))
    if "light" in which:
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
    if "resize" in which:
        k = rng.uniform(0.5, 0.8)
        im = im.resize((max(32, int(im.width * k)), max(32, int(im.height * k))), Image.Resampling.BILINEAR)
    if "jpeg" in which:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(40, 70)))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im


EDITS = [["mirror"], ["crop"], ["light"], ["jpeg"], ["resize"], ["mirror", "crop", "light"],
         ["mirror", "crop", "light", "jpeg", "resize"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-set", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from extendserve.bases.base import resolve_base
    from extendserve.photos.preprocess import list_images
    from extendserve.training.features import FeatureExtractor

    base = resolve_base("efficientnet_lite0")
    fx = FeatureExtractor(base, Path(tempfile.mkdtemp(prefix="near-copies-cache-")))
    rng = np.random.default_rng(a.seed)
    lines = ["| set | score | threshold | copies found (by edit: " + ", ".join("+".join(e) for e in EDITS) +
             ") | pairs of different classes over it | same class over it | highest different pair | lowest copy |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for set_name, root in SETS.items():
        if not root.is_dir():
            print(f"{set_name}: {root} absent, skipped")
            continue
        files = list_images(root)
        picked = [files[i] for i in sorted(rng.choice(len(files), min(a.per_set, len(files)), replace=False))]
        work = Path(tempfile.mkdtemp(prefix="near-copies-"))
        copies, kinds = [], []
        for k, f in enumerate(picked):
            which = EDITS[k % len(EDITS)]
            out = work / f"{k}.jpg"
            edit(Image.open(f), rng, which).save(out, quality=92)
            copies.append(out)
            kinds.append("+".join(which))
        feats_all, ok, _ = fx.extract(files)
        feats_copy, ok_c, _ = fx.extract(copies)
        assert len(ok) == len(files) and len(ok_c) == len(copies)
        index = {f: i for i, f in enumerate(files)}
        orig = np.array([index[f] for f in picked])
        classes = np.array([f.parent.name for f in files])
        for score_name, views in (("centre only, 0.98 (before)", False), ("best of centre, full, mirrored", True)):
            s_copy = np.array([near_copy_scores(feats_all[orig[k]][None], feats_copy[k][None], views)[0, 0]
                               for k in range(len(copies))])
            s_all = near_copy_scores(feats_all, feats_all, views)
            s_all = np.maximum(s_all, s_all.T)
            labels = np.unique(classes, return_inverse=True)[1]
            limit = copy_threshold(s_all, labels) if views else 0.98
            iu = np.triu_indices(len(files), 1)
            diff = s_all[iu]
            same = classes[iu[0]] == classes[iu[1]]
            by_edit = []
            for e in EDITS:
                sel = [i for i, kd in enumerate(kinds) if kd == "+".join(e)]
                by_edit.append(f"{int((s_copy[sel] >= limit).sum())}/{len(sel)}")
            row = (f"| {set_name} | {score_name} | {limit:.3f} | " + ", ".join(by_edit) +
                   f" | {int((diff[~same] >= limit).sum())} of {int((~same).sum())} | "
                   f"{int((diff[same] >= limit).sum())} of {int(same.sum())} | {diff.max():.3f} | {s_copy.min():.3f} |")
            print(row, flush=True)
            lines.append(row)
    body = "\n".join(lines) + ("\n\nScores are cosine similarities of the power-transformed features (as the "
                               "suspicious-photo check uses them). A near-copy is a pair at or over the threshold.")
    write_section("near_copies", "Near-copies against different photos", "python bench/heads/near_copies.py", body)


if __name__ == "__main__":
    main()
