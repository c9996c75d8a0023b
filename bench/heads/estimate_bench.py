"""How well the service's live estimate of a head's accuracy (the mean calibrated top score of the
photos it named: ``extendserve:head_estimated_accuracy``) follows the truth, fed known mixes.

For each shared set (faces, hand signs, garments) each of up to five classes is left out in turn:
a head is trained on the others' photos less a held-out fifth (train_head, every default) with half
of the ImageNet sample as its background. It is then fed mixes of three kinds of photo: held-out
photos of its classes, the other half of the ImageNet sample, and the left-out class's photos
(strangers), at 90/10, 50/50 and 10/90 known/other (the other half ImageNet, half strangers), 400
photos drawn with replacement. Truth: of the photos the head named, the share named right. The
scores are the merged model's (score_features: the graph's formula on the photos' features).
Usage: python bench/heads/estimate_bench.py
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

import numpy as np

from extendserve.bases.base import builtin_base
from extendserve.bases.pretrained import load_backbone
from extendserve.bases.world import Background
from extendserve.training.features import FeatureExtractor, scan_folder
from extendserve.training.train import TrainSettings, score_features, split, train_head

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import SAMPLE, SHARED, write_section  # noqa: E402

SETS = {"faces": SHARED / "celebs" / "train", "hand signs": SHARED / "signs", "garments": SHARED / "clothes"}
MIXES = (0.9, 0.5, 0.1)
DRAWN = 400


def softmax_top(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = logits - logits.max(1, keepdims=True)
    return logits.argmax(1), 1.0 / np.exp(z).sum(1)


def main() -> None:
    base = builtin_base(load_backbone())
    fx = FeatureExtractor(base)
    sample = sorted(SAMPLE.glob("*.JPEG"))
    inet, _, _ = fx.extract(sample)
    order = np.random.default_rng(0).permutation(len(inet))
    background = Background(inet[order[:100], 0], "half the ImageNet sample")
    unseen = inet[order[100:], 0]
    k = len(base.labels)
    rows, gaps = [], {m: [] for m in MIXES}
    for name, root in SETS.items():
        ds = scan_folder(root)
        feats, ok, _ = fx.extract(ds.files)
        labels = np.array([ds.labels[i] for i in ok])
        for out in range(min(5, len(ds.classes))):
            keep = labels != out
            f, y = feats[keep], labels[keep] - (labels[keep] > out)
            tr, ho = split(y, 0.2, out)
            classes = [c for i, c in enumerate(ds.classes) if i != out]
            head, _ = train_head(base, f[tr], y[tr], classes, TrainSettings(), background=background)
            kinds = {"known": (score_features(base, head, f[ho, 0]), y[ho] + k),
                     "imagenet": (score_features(base, head, unseen), np.full(len(unseen), -1)),
                     "strangers": (score_features(base, head, feats[labels == out, 0]),
                                   np.full(int((labels == out).sum()), -1))}
            rng = np.random.default_rng(out)
            for mix in MIXES:
                n_known = int(DRAWN * mix)
                other = DRAWN - n_known
                picks = [("known", n_known), ("imagenet", other // 2), ("strangers", other - other // 2)]
                idx = [rng.integers(0, len(kinds[kd][0]), n) for kd, n in picks]
                logits = np.concatenate([kinds[kd][0][i] for (kd, _), i in zip(picks, idx)])
                truth = np.concatenate([kinds[kd][1][i] for (kd, _), i in zip(picks, idx)])
                best, top = softmax_top(logits)
                named = best >= k
                if not named.any():
                    continue
                estimate, real = float(top[named].mean()), float((best[named] == truth[named]).mean())
                gaps[mix].append(estimate - real)
                rows.append((name, ds.classes[out], mix, int(named.sum()), estimate, real))
            print(rows[-1], flush=True)
    table = ["| set | left out (strangers) | known share fed | photos named by the head | estimated accuracy | real accuracy |",
             "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {s} | {c} | {m:.0%} | {n} | {e:.3f} | {r:.3f} |" for s, c, m, n, e, r in rows]
    summary = ["", "| known share fed | mean estimate - real | worst (largest) gap |", "| --- | --- | --- |"]
    summary += [f"| {m:.0%} | {np.mean(g):+.3f} | {max(g, key=abs):+.3f} |" for m, g in gaps.items() if g]
    body = "\n".join(summary[1:] + [""] + table)
    print(body)
    write_section("estimate", "The live estimate of a head's accuracy against the truth",
                  "python bench/heads/estimate_bench.py", body)


if __name__ == "__main__":
    main()
