"""What --unfreeze-top K buys and costs, K = 0, 1, 2, on the calibration bench's fixed split.

Shared celebrities, 4 held-out photos per person (seed 0, as bench/heads/calibration.py); every row is
the real CLI: train-head (--holdout 0) -> build -> eval on model.onnx; then the model's size and
its photos/s at batch 16 (onnxruntime, this machine), measured side by side in one run.
Usage: python bench/training/unfreeze_bench.py   (needs ../shared/data)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "heads"))  # calibration.py
from calibration import fixed_split, link_tree, run  # noqa: E402
from common import SHARED, best_rate, write_section  # noqa: E402


def main() -> None:
    celebs = SHARED / "celebs" / "train"
    if not celebs.is_dir():
        raise SystemExit("needs ../shared/data/celebs/train")
    from extendserve.serving.runtime import Model

    people, split = fixed_split(celebs)
    rows = []
    x = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        train = link_tree(t / "train", {p: split[p][0] for p in people})
        held = link_tree(t / "held", {p: split[p][1] for p in people})
        for k in (0, 1, 2):
            t0 = time.time()
            run("train-head", str(train), "-o", str(t / f"k{k}.pt"), "--holdout", "0", "--unfreeze-top", str(k))
            secs = time.time() - t0
            run("build", "--new-head", str(t / f"k{k}.pt"), "-o", str(t / f"m{k}"))
            ev = json.loads(run("eval", "--model", str(t / f"m{k}"), "--new", str(held),
                                "--imagenet", str(SHARED / "imagenet-sample"), "--json"))
            size = (t / f"m{k}" / "model.onnx").stat().st_size / 2**20
            rows.append([k, ev, size, secs, t / f"m{k}"])
            print(k, ev["new"]["accuracy"], ev["imagenet"]["stolen"], flush=True)
        speeds = [best_rate(lambda m=Model(r[4]): m.run(x), 16, 3, 1.0) for r in rows]
    lines = ["| K (top blocks fine-tuned) | held-out new photos right | ImageNet stolen (200) | top-1 before -> after "
             "| model.onnx MB | photos/s, batch 16 | vs K=0 | train-head s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (k, ev, size, secs, _), sp in zip(rows, speeds):
        im = ev["imagenet"]
        lines.append(f"| {k} | {ev['new']['accuracy']:.1%} of {ev['new']['photos']} | {im['stolen']:.1%} | "
                     f"{im['top1_before']:.1%} -> {im['top1_after']:.1%} | {size:.1f} | {sp:.1f} | "
                     f"{sp / speeds[0]:.2f} | {secs:.0f} |")
    print("\n".join(lines))
    write_section("unfreeze", "Partial unfreezing: --unfreeze-top K on the shared celebrities",
                  "python bench/training/unfreeze_bench.py", "Fixed split: 4 held-out photos per person (seed 0); "
                  "default settings otherwise.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
