"""The gated head over many random held-out splits (the fixed split of calibration.py is one).

Works on cached features with the project's own training and scoring code (the same formula the
ONNX graph computes; export parity is tested separately). Per split: 4 held-out photos per
person; all 200 ImageNet sample photos for the stolen share. Besides each gate it reports the
ranker alone, told the photo is one of the people: the ceiling a gate can only lose from.
Usage: python bench/heads/calibration_splits.py [--splits 30] [--first-seed 100] [--people 5 2]
       [--gates mahalanobis cosine] [--out docs/calibration_splits.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys as _sys  # noqa: E402
import time
from pathlib import Path
from pathlib import Path as _Path  # noqa: E402

import numpy as np

from extendserve.bases.base import builtin_base
from extendserve.bases.pretrained import load_backbone
from extendserve.training.features import FeatureExtractor, scan_folder
from extendserve.training.train import TrainSettings, fit, score_features

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import machine

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=30)
    ap.add_argument("--first-seed", type=int, default=100)
    ap.add_argument("--people", type=int, nargs="+", default=[5, 2])
    ap.add_argument("--gates", nargs="+", default=["mahalanobis", "cosine"])
    ap.add_argument("--out", default=str(ROOT / "docs" / "calibration_splits.md"))
    a = ap.parse_args()
    bb = builtin_base(load_backbone())
    fx = FeatureExtractor(bb)
    ds = scan_folder(SHARED / "celebs" / "train")
    all_feats, ok, _ = fx.extract(ds.files)
    all_labels = np.array(ds.labels)[ok]
    inet, _, _ = fx.extract(sorted((SHARED / "imagenet-sample").iterdir()))
    seeds = range(a.first_seed, a.first_seed + a.splits)
    lines = ["| people | gate | held-out right (mean, min) | gate lets in (held-out) | ImageNet stolen (mean, max) "
             "| ranker alone, told it is one of them | train s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for people in a.people:
        keep = all_labels < people
        feats, labels = all_feats[keep], all_labels[keep]
        classes = ds.classes[:people]
        rows: dict[str, list[tuple[float, ...]]] = {g: [] for g in a.gates}
        for seed in seeds:
            rng = np.random.default_rng(seed)
            held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:4] for c in range(people)])
            train = np.setdiff1d(np.arange(len(labels)), held)
            for gate in a.gates:
                t0 = time.time()
                s = dataclasses.replace(TrainSettings(), method="gated", gate=gate)
                head = fit(bb, feats[train], labels[train], classes, s, label=f"{people}p split {seed} {gate}")
                took = time.time() - t0
                merged = score_features(bb, head, feats[held, 0])
                passed = merged[:, 1000:].max(1) > merged[:, :1000].max(1)
                ranker = (feats[held, 0] @ head.weight.numpy().T + head.bias.numpy()).argmax(1) == labels[held]
                ext = score_features(bb, head, inet[:, 0])
                rows[gate].append(((merged.argmax(1) == labels[held] + 1000).mean(), passed.mean(),
                                   (ext.argmax(1) >= 1000).mean(),
                                   ranker.mean(), took))
        for gate, r in rows.items():
            r = np.array(r)
            lines.append(f"| {people} | {gate} | {r[:, 0].mean():.1%} ({r[:, 0].min():.0%}) | {r[:, 1].mean():.1%} | "
                         f"{r[:, 2].mean():.2%} ({r[:, 2].max():.1%}) | {r[:, 3].mean():.1%} | {r[:, 4].mean():.1f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    Path(a.out).write_text(
        "# The gated head over random splits\n\n"
        f"Command: `python bench/heads/calibration_splits.py --splits {a.splits} --first-seed {a.first_seed}` "
        f"(needs ../shared/data).\n{machine()}\n\n"
        f"Seeds {seeds.start}-{seeds.stop - 1}, 4 held-out photos per person each; stolen over all 200 ImageNet "
        "sample photos. 'Held-out right' is top-1 among all 1000 + N outputs.\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
