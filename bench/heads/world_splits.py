"""New classes against the world they join, over random splits of every shared set.

For each split the head gets a background of 100 of the 200 ImageNet sample photos (standing in
for the shipped one) and is judged on the other 100 ("unseen ImageNet": share taken, top-1 before
and after). Sets: the 5 celebrities, leave-one-person-out strangers (train on 4, ask about the
5th), hand signs, garments (20% of each class held out), and broad classes: 10 photos of one kind
of ImageNet photo (dogs, birds, reptiles, food, fish and invertebrates) as one class, judged on the
unseen photos of other kinds. The probe is a logistic regression (C = 1) on the training photos'
centre crops among the new classes only, told that the photo is one of them. ECE: top-1 score
over held-out known photos, strangers (right when not named as a known person) and unseen
ImageNet photos, 10 bins. Works on cached features with the project's own fit and scoring.
Usage: python bench/heads/world_splits.py [--splits 10] [--methods calibrated gated] [--out docs/world_splits.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys as _sys  # noqa: E402
import time
from pathlib import Path
from pathlib import Path as _Path  # noqa: E402

import numpy as np
import torch

from extendserve.bases.base import builtin_base
from extendserve.bases.imagenet import synset_index
from extendserve.bases.pretrained import load_backbone
from extendserve.bases.world import Background
from extendserve.training.features import FeatureExtractor, scan_folder
from extendserve.training.train import TrainSettings, fit, score_features

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from logistic import fit_logistic

from common import SAMPLE, SHARED, machine

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"dogs": [(151, 268)], "birds": [(7, 24), (80, 100), (127, 146)], "reptiles": [(25, 68)],
         "food": [(924, 969)], "fish+invertebrates": [(0, 6), (69, 79), (107, 126), (300, 326)]}


def kind_of(index: int) -> str:
    return next((k for k, spans in KINDS.items() if any(a <= index <= b for a, b in spans)), "other")


def ece(conf: np.ndarray, right: np.ndarray, bins: int = 10) -> float:
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum((idx == i).mean() * abs(conf[idx == i].mean() - right[idx == i].mean())
                     for i in range(bins) if (idx == i).any()))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class Bench:
    def __init__(self, base, method: str):
        self.base, self.method = base, method
        self.s = dataclasses.replace(TrainSettings(), method=method)
        fx = FeatureExtractor(base)
        files = sorted(p for p in SAMPLE.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
        f, ok, _ = fx.extract(files)
        self.inet, self.inet_y = f[:, 0], np.array([synset_index(files[i].name.split("_")[0]) for i in ok])
        self.kinds = np.array([kind_of(int(i)) for i in self.inet_y])
        self.sets = {}
        for name, root in (("celebs", SHARED / "celebs" / "train"), ("signs", SHARED / "signs"),
                           ("clothes", SHARED / "clothes")):
            ds = scan_folder(root)
            f, ok, _ = fx.extract(ds.files)
            self.sets[name] = (f, np.array(ds.labels)[ok], ds.classes)
        self.k = len(base.labels)

    def top1(self, logits: np.ndarray, y: np.ndarray) -> float:
        return float((logits.argmax(1) == y).mean())

    def domain(self, name: str, seed: int, strangers: bool) -> dict:
        f, y, classes = self.sets[name]
        n, k = len(classes), self.k
        rng = np.random.default_rng(1000 + seed)
        perm = rng.permutation(len(self.inet))
        bg, ev = perm[: len(perm) // 2], perm[len(perm) // 2:]
        held = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: max(2, round(0.2 * (y == c).sum()))]
                               for c in range(n)])
        train = np.setdiff1d(np.arange(len(y)), held)
        out = seed % n if strangers else -1
        tr, ho = train[y[train] != out], held[y[held] != out]
        remap = np.array([c - (c > out) if out >= 0 else c for c in range(n)])
        names = [c for i, c in enumerate(classes) if i != out]
        head = fit(self.base, f[tr], remap[y[tr]], names, self.s, f"{name} {seed}",
                   background=Background(self.inet[bg], "half the sample"))
        known = score_features(self.base, head, f[ho, 0])
        unseen = score_features(self.base, head, self.inet[ev])
        yho = remap[y[ho]]
        w, b = fit_logistic(f[tr][:, :1], remap[y[tr]], len(names), 1.0)
        r = {"acc": float((known.argmax(1) == yho + k).mean()),
             "probe": float(((f[ho, 0] @ w.T + b).argmax(1) == yho).mean()),
             "taken": float((unseen.argmax(1) >= k).mean()),
             "before": self.top1(self.inet[ev] @ self.base.weight.T + self.base.bias, self.inet_y[ev]),
             "after": self.top1(unseen, self.inet_y[ev])}
        p_known, p_unseen = softmax(known), softmax(unseen)
        conf = [p_known.max(1), p_unseen.max(1)]
        right = [p_known.argmax(1) == yho + k, p_unseen.argmax(1) == self.inet_y[ev]]
        if strangers:
            st = softmax(score_features(self.base, head, f[y == out, 0]))
            r["strangers"] = float((st.argmax(1) >= k).mean())
            conf.append(st.max(1))
            right.append(st.argmax(1) < k)
        r["ece"] = ece(np.concatenate(conf), np.concatenate(right).astype(float))
        base_p = softmax(self.inet[ev] @ self.base.weight.T + self.base.bias)
        r["ece_base"] = ece(base_p.max(1), (base_p.argmax(1) == self.inet_y[ev]).astype(float))
        return r

    def broad(self, seed: int) -> dict:
        kinds = [k for k in KINDS if (self.kinds == k).sum() >= 10]
        kind = kinds[seed % len(kinds)]
        rng = np.random.default_rng(2000 + seed)
        tr = rng.permutation(np.flatnonzero(self.kinds == kind))[:10]
        rest = rng.permutation(np.setdiff1d(np.arange(len(self.inet)), tr))
        bg, ev = rest[: len(rest) // 2], rest[len(rest) // 2:]
        ev = ev[self.kinds[ev] != kind]
        feats = self.inet[tr][:, None, :]
        if self.method != "calibrated":  # the other methods want the views; the centre crop is all we kept
            feats = np.repeat(feats, 2, axis=1)
        head = fit(self.base, feats, np.zeros(len(tr), np.int64), [f"my {kind}"], self.s, f"broad {seed}",
                   background=Background(self.inet[bg], "half the sample"))
        unseen = score_features(self.base, head, self.inet[ev])
        p = softmax(unseen)
        return {"kind": kind, "taken": float((unseen.argmax(1) >= self.k).mean()),
                "before": self.top1(self.inet[ev] @ self.base.weight.T + self.base.bias, self.inet_y[ev]),
                "after": self.top1(unseen, self.inet_y[ev]),
                "ece": ece(p.max(1), (p.argmax(1) == self.inet_y[ev]).astype(float))}


def fmt(rows: list[dict], key: str, worst: str) -> str:
    v = np.array([r[key] for r in rows if key in r])
    if not len(v):
        return "-"
    w = v.min() if worst == "min" else v.max()
    return f"{v.mean():.3f} ({w:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["calibrated", "gated"])
    ap.add_argument("--sets", nargs="+", default=["celebs", "strangers", "signs", "clothes", "broad"])
    ap.add_argument("--out", default=str(ROOT / "docs" / "world_splits.md"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    base = builtin_base(load_backbone())
    lines = ["| set | method | new-class top-1 (mean, worst) | probe told the answer | unseen ImageNet taken (mean, worst) "
             "| ImageNet top-1 before -> after | strangers named | ECE (mean, worst) | base's own ECE |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    t0 = time.time()
    for method in a.methods:
        b = Bench(base, method)
        for name in a.sets:
            rows = [b.broad(s) if name == "broad" else b.domain("celebs" if name == "strangers" else name, s,
                                                                  name == "strangers") for s in range(a.splits)]
            before, after = np.mean([r["before"] for r in rows]), np.mean([r["after"] for r in rows])
            lines.append(f"| {name} | {method} | {fmt(rows, 'acc', 'min')} | {fmt(rows, 'probe', 'min')} | "
                         f"{fmt(rows, 'taken', 'max')} | {before:.3f} -> {after:.3f} | {fmt(rows, 'strangers', 'max')} | "
                         f"{fmt(rows, 'ece', 'max')} | {fmt(rows, 'ece_base', 'max')} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    Path(a.out).write_text(
        "# New classes against the world, over random splits\n\n"
        f"Command: `python bench/heads/world_splits.py --splits {a.splits} --methods {' '.join(a.methods)}` "
        f"(needs ../shared/data; {time.time() - t0:.0f} s).\n{machine()}\n\n"
        + (__doc__ or "").split("Usage:")[0].strip() + "\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
