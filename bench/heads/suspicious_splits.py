"""How many clean photos the suspicious-photo check flags, and whether it still finds a wrong one,
over random splits of every shared set, at several limits.

Each split keeps a random 80% of each class of a set (faces, hand signs, garments); the check is
run on the clean photos (every flag is a false one: these folders hold no wrong photo, bar the
one or two a person would argue about), then again with the tench (an ImageNet fish) planted in a
random class. Copies between classes are counted apart (their limit comes from the folder).
Usage: python bench/heads/suspicious_splits.py [--splits 30]
"""

from __future__ import annotations

import argparse
import sys as _sys
from pathlib import Path as _Path

import numpy as np

from extendserve.bases.base import builtin_base
from extendserve.bases.pretrained import load_backbone
from extendserve.heads.checks import OUTLIER_Z, _typical, _unit, copy_threshold, near_copy_scores
from extendserve.training.features import FeatureExtractor, scan_folder

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import SAMPLE, SHARED, write_section  # noqa: E402

LIMITS = (4.0, 5.0, 6.0, 7.0, 8.0)
SETS = {"faces": SHARED / "celebs" / "train", "hand signs": SHARED / "signs", "garments": SHARED / "clothes"}


def zscores(feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return _typical(_unit(np.sqrt(np.maximum(feats[:, 0], 0))), labels, int(labels.max()) + 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=30)
    a = ap.parse_args()
    fx = FeatureExtractor(builtin_base(load_backbone()))
    tench, _, _ = fx.extract([SAMPLE / "n01440764_tench.JPEG"])
    rows = []
    for name, root in SETS.items():
        ds = scan_folder(root)
        feats, ok, _ = fx.extract(ds.files)
        labels = np.array([ds.labels[i] for i in ok])
        flags = {z: [] for z in LIMITS}
        caught = {z: 0 for z in LIMITS}
        copies = []
        for seed in range(a.splits):
            rng = np.random.default_rng(seed)
            keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: max(4, int(0.8 * (labels == c).sum()))]
                                           for c in np.unique(labels)]))
            f, y = feats[keep], labels[keep]
            z = zscores(f, y)
            for lim in LIMITS:
                flags[lim].append(float((z > lim).mean()))
            sim = near_copy_scores(f, f)
            sim = np.maximum(sim, sim.T)
            pairs = np.triu(sim >= copy_threshold(sim, y), 1) & (y[:, None] != y[None])
            copies.append(float(np.unique(np.nonzero(pairs)).size / len(y)))
            planted_class = int(rng.integers(0, y.max() + 1))
            zt = zscores(np.concatenate([f, tench]), np.concatenate([y, [planted_class]]))
            for lim in LIMITS:
                caught[lim] += int(zt[-1] > lim)
        for lim in LIMITS:
            fl = np.array(flags[lim])
            rows.append(f"| {name} | {len(labels)} | {lim:g}{' (default)' if lim == OUTLIER_Z else ''} | "
                        f"{fl.mean():.2%} | {fl.max():.2%} | {caught[lim]}/{a.splits} |")
        rows.append(f"| {name} | {len(labels)} | copies between classes | {np.mean(copies):.2%} | {np.max(copies):.2%} | - |")
        print("\n".join(rows[-len(LIMITS) - 1 :]), flush=True)
    body = "\n".join([f"{a.splits} random splits of each set (80% of each class's photos kept); flagged: the share of "
                      "clean photos flagged as out of place (mean, worst split); the tench planted in a random class: "
                      "splits where it was flagged.", "",
                      "| set | photos | limit (deviations) | clean photos flagged | worst split | tench caught |",
                      "| --- | --- | --- | --- | --- | --- |", *rows])
    print(body)
    write_section("suspicious_splits", "Suspicious photos: false flags against the limit",
                  f"python bench/heads/suspicious_splits.py --splits {a.splits}", body)


if __name__ == "__main__":
    main()
