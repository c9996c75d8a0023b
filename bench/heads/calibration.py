"""The calibration table: naive concatenation, joint softmax, gated (cosine gate; the default
mahalanobis gate), with negatives.

Real pipeline end to end (train-head -> build -> eval on model.onnx) on the shared photos:
- new classes: 4 held-out photos per person (seed 0), the rest trained on; 5 people and 2 people;
- ImageNet: ``imagenet-sample`` split in two by position: even photos may serve as negatives
  (``--negatives``), odd photos are never trained on; every row is scored on the odd 100, rows
  without negatives on all 200 as well.

Usage: python bench/heads/calibration.py [--shared ../shared/data] [--out docs/calibration.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [("naive concatenation", ["--method", "naive"], False),
        ("joint softmax", ["--method", "joint"], False),
        ("joint softmax + negatives", ["--method", "joint"], True),
        ("gated, cosine gate", ["--method", "gated", "--gate", "cosine"], False),
        ("gated, mahalanobis gate", ["--method", "gated"], False),
        ("gated + negatives", ["--method", "gated"], True),
        ("calibrated (default; background in-sample here)", [], False)]


def run(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "extendserve", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"extendserve {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def link_tree(dst: Path, mapping: dict[str, list[Path]]) -> Path:
    for cls, files in mapping.items():
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            (dst / cls / f.name).symlink_to(f.resolve())
    return dst


def fixed_split(celebs: Path, held: int = 4, seed: int = 0) -> tuple[list[str], dict[str, tuple[list[Path], list[Path]]]]:
    """People, and per person (training photos, ``held`` held-out photos): the benches' fixed split."""
    import numpy as np

    people = sorted(p.name for p in celebs.iterdir() if p.is_dir())
    rng = np.random.default_rng(seed)
    split = {}
    for p in people:
        files = sorted((celebs / p).iterdir())
        order = rng.permutation(len(files))
        split[p] = ([files[i] for i in order[held:]], [files[i] for i in order[:held]])
    return people, split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default="docs/calibration.md")
    a = ap.parse_args()
    shared = Path(a.shared)
    celebs = shared / "celebs" / "train"
    imagenet = sorted((shared / "imagenet-sample").iterdir())

    people, split = fixed_split(celebs)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        neg = t / "negatives"
        neg.mkdir()
        for f in imagenet[0::2]:
            (neg / f.name).symlink_to(f.resolve())
        odd = t / "imagenet-odd"
        odd.mkdir()
        for f in imagenet[1::2]:
            (odd / f.name).symlink_to(f.resolve())
        for group in (people, people[:2]):
            tag = f"{len(group)}p"
            train = link_tree(t / f"train-{tag}", {p: split[p][0] for p in group})
            held = link_tree(t / f"held-{tag}", {p: split[p][1] for p in group})
            for name, flags, use_neg in ROWS:
                head = t / f"{tag}-{len(results)}.pt"
                model = t / f"model-{tag}-{len(results)}"
                t0 = time.time()
                run("train-head", str(train), "-o", str(head), "--holdout", "0", *flags,
                    *(["--negatives", str(neg)] if use_neg else []))
                t_train = time.time() - t0
                run("build", "--new-head", str(head), "-o", str(model))
                ev_odd = json.loads(run("eval", "--model", str(model), "--new", str(held), "--imagenet", str(odd), "--json"))
                row = {"people": len(group), "method": name, "train_s": round(t_train, 1),
                       "new_acc": ev_odd["new"]["accuracy"], "held_photos": ev_odd["new"]["photos"],
                       "stolen_odd": ev_odd["imagenet"]["stolen"],
                       "top1_before_odd": ev_odd["imagenet"]["top1_before"],
                       "top1_after_odd": ev_odd["imagenet"]["top1_after"]}
                if not use_neg:
                    ev_all = json.loads(run("eval", "--model", str(model), "--imagenet", str(shared / "imagenet-sample"),
                                            "--json"))
                    row |= {"stolen_all": ev_all["imagenet"]["stolen"], "top1_before_all": ev_all["imagenet"]["top1_before"],
                            "top1_after_all": ev_all["imagenet"]["top1_after"]}
                results.append(row)
                print(json.dumps(row), flush=True)
    lines = ["| people | method | held-out new photos right | ImageNet stolen (odd 100) | top-1 before -> after (odd 100) "
             "| stolen (all 200) | top-1 before -> after (all 200) | train-head s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        all_cols = (f"{r['stolen_all']:.1%} | {r['top1_before_all']:.1%} -> {r['top1_after_all']:.1%}"
                    if "stolen_all" in r else "n/a (negatives drawn from these) | n/a")
        lines.append(f"| {r['people']} | {r['method']} | {r['new_acc']:.1%} of {r['held_photos']} | {r['stolen_odd']:.1%} | "
                     f"{r['top1_before_odd']:.1%} -> {r['top1_after_odd']:.1%} | {all_cols} | {r['train_s']} |")
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Calibration, measured\n\nCommand: `python bench/heads/calibration.py` (needs ../shared/data).\n"
                   f"Machine: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}.\n\n{table}\n")


if __name__ == "__main__":
    main()
