"""Do the head's own checks tell the truth? Strangers, suspicious photos, one wrong photo.

    python bench/heads/checks_bench.py [--seeds 3]

1. Strangers: each of the five shared celebrities left out in turn; a head trained on the other four
   reports ``strangers_named`` (leaving each of its classes out in turn); the left-out person's photos
   are then scored by that head: the share named as one of the four is what really happens.
2. Suspicious photos on the clean shared folders (faces, hand signs, garments): how many are flagged.
3. One wrong photo: an ImageNet fish (the tench) among one person's photos, over random held-out
   splits: flagged or not, and held-out accuracy with it (left out by default, or kept) against without.
Rewrites its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys as _sys  # noqa: E402
import tempfile
from pathlib import Path
from pathlib import Path as _Path  # noqa: E402

import numpy as np

from extendserve.bases.base import builtin_base  # noqa: E402
from extendserve.bases.pretrained import load_backbone  # noqa: E402
from extendserve.bases.world import background_for  # noqa: E402
from extendserve.training.features import FeatureExtractor, scan_folder  # noqa: E402
from extendserve.training.train import TrainSettings, score_features, train_head  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import SAMPLE, SHARED, write_section

CELEBS = SHARED / "celebs" / "train"


def load(fx: FeatureExtractor, root: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    ds = scan_folder(root)
    feats, ok, _ = fx.extract(ds.files)
    return feats, np.array([ds.labels[i] for i in ok]), ds.classes, [str(Path(ds.files[i]).relative_to(root)) for i in ok]


def strangers(base, fx, world) -> tuple[str, list[float]]:  # type: ignore[no-untyped-def]
    feats, labels, classes, names = load(fx, CELEBS)
    rows, diffs = [], []
    for out in range(len(classes)):
        keep = labels != out
        lab = labels[keep] - (labels[keep] > out)
        others = [c for i, c in enumerate(classes) if i != out]
        head, report = train_head(base, feats[keep], lab, others, TrainSettings(), background=world,
                                  names=[n for n, k in zip(names, keep) if k])
        logits = score_features(base, head, feats[~keep, 0])
        real = float((logits.argmax(1) >= len(base.labels)).mean())
        said = report.checks["strangers_named"]
        diffs.append(abs(said - real))
        rows.append(f"| {classes[out]} | {said:.2f} | {real:.2f} | {said - real:+.2f} |")
        print(rows[-1])
    table = ("| left out | reported `strangers_named` | named as one of the four | difference |\n|---|---|---|---|\n"
             + "\n".join(rows))
    return table, diffs


def flagged(base, fx) -> str:  # type: ignore[no-untyped-def]
    rows = []
    for name, root in (("faces", CELEBS), ("hand signs", SHARED / "signs"), ("garments", SHARED / "clothes")):
        feats, labels, classes, names = load(fx, root)
        from extendserve.heads.checks import suspicious

        logits = feats[:, 0] @ base.weight.T + base.bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        found = suspicious(feats[:, 0], labels, classes, names, p / p.sum(1, keepdims=True), base.labels)
        rows.append(f"| {name} | {len(labels)} | {len(found)} | {'; '.join(x['file'] + ': ' + x['why'] for x in found)} |")
        print(rows[-1])
    return "| clean folder | photos | flagged | which, why |\n|---|---|---|---|\n" + "\n".join(rows)


def wrong_photo(base, fx, world, seeds: int) -> str:  # type: ignore[no-untyped-def]
    """The tench among Ben Afflek's photos."""
    tmp = Path(tempfile.mkdtemp())
    try:
        for d in CELEBS.iterdir():
            shutil.copytree(d, tmp / d.name)
        shutil.copy(SAMPLE / "n01440764_tench.JPEG", tmp / "Ben Afflek" / "zz_fish.jpg")
        f1, l1, c1, n1 = load(fx, tmp)
    finally:
        shutil.rmtree(tmp)
    fish = n1.index("Ben Afflek/zz_fish.jpg")
    clean = np.arange(len(l1)) != fish
    rows = []
    for seed in range(seeds):
        s = TrainSettings(seed=seed)
        _, r0 = train_head(base, f1[clean], l1[clean], c1, s, background=world, names=[n for n, k in zip(n1, clean) if k])
        _, r1 = train_head(base, f1, l1, c1, s, background=world, names=n1)
        kept = TrainSettings(seed=seed, keep_suspicious=True)
        _, r2 = train_head(base, f1, l1, c1, kept, background=world, names=n1)
        hit = any(x["file"] == "Ben Afflek/zz_fish.jpg" for x in r1.suspicious)
        rows.append(f"| {seed} | {'yes' if hit else 'no'} | {r0.heldout['accuracy']:.3f} | {r1.heldout['accuracy']:.3f} | "
                    f"{r2.heldout['accuracy']:.3f} |")
        print(rows[-1])
    return ("| split seed | fish flagged | held-out accuracy, clean | with the fish (left out) | with the fish kept "
            "(--keep-suspicious) |\n|---|---|---|---|---|\n" + "\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    base = builtin_base(load_backbone())
    fx = FeatureExtractor(base)
    world = background_for(base)
    table, diffs = strangers(base, fx, world)
    body = (f"### Strangers\n\n{table}\n\nLargest difference {max(diffs):.2f} (the issue asks within 0.2); the shared "
            "photos are the training split, so the left-out person's photos stand in for strangers.\n\n"
            f"### Suspicious photos on clean folders\n\n{flagged(base, fx)}\n\n"
            f"### One wrong photo: a tench among Ben Afflek's photos\n\n{wrong_photo(base, fx, world, a.seeds)}\n")
    write_section("checks", "The head's checks: strangers, suspicious photos",
                  f"python bench/heads/checks_bench.py --seeds {a.seeds}", body)


if __name__ == "__main__":
    main()
