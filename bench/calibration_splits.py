"""The gated head over many random held-out splits (the fixed split of calibration.py is one).

Works on cached features with the project's own training and scoring code (the same formula the
ONNX graph computes; export parity is tested separately), so 8 splits take about a minute.
Usage: python bench/calibration_splits.py [--splits 8] [--people 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from extendserve.backbone import load_backbone
from extendserve.features import FeatureExtractor, scan_folder
from extendserve.train import TrainSettings, fit, score_features

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=8)
    ap.add_argument("--people", type=int, default=5)
    a = ap.parse_args()
    bb = load_backbone()
    fx = FeatureExtractor(bb)
    ds = scan_folder(SHARED / "celebs" / "train")
    feats, ok, _ = fx.extract(ds.files)
    labels = np.array(ds.labels)[ok]
    keep = labels < a.people
    feats, labels = feats[keep], labels[keep]
    classes = ds.classes[: a.people]
    inet_files = sorted((SHARED / "imagenet-sample").iterdir())
    inet, _, _ = fx.extract(inet_files)
    rows = []
    for seed in range(a.splits):
        rng = np.random.default_rng(seed)
        held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:4] for c in range(a.people)])
        train = np.setdiff1d(np.arange(len(labels)), held)
        head = fit(bb, feats[train], labels[train], classes, TrainSettings(), label=f"split {seed}")
        new = score_features(bb, head, feats[held, 0]).argmax(1)
        ext = score_features(bb, head, inet[:, 0])
        rows.append(((new == labels[held] + 1000).mean(), (ext.argmax(1) >= 1000).mean()))
        print(f"split {seed}: held-out right {rows[-1][0]:.3f}, ImageNet stolen {rows[-1][1]:.3f}")
    r = np.array(rows)
    print(f"mean over {a.splits} splits, {a.people} people: held-out right {r[:, 0].mean():.3f} "
          f"(min {r[:, 0].min():.3f}), ImageNet stolen {r[:, 1].mean():.4f} (max {r[:, 1].max():.3f})")


if __name__ == "__main__":
    main()
