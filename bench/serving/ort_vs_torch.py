"""The feature graph (uint8 pixels -> 1280 features) in onnxruntime vs torch eager, side by side.

Usage: python bench/serving/ort_vs_torch.py [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from extendserve.bases.backbone import InputAdapter
from extendserve.bases.base import builtin_base
from extendserve.bases.pretrained import load_backbone
from extendserve.training.features import FeatureExtractor


def rate(fn, x, repeats: int) -> float:
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    bb = load_backbone()
    sess = FeatureExtractor(builtin_base(bb)).session()
    x = np.random.default_rng(0).integers(0, 256, (a.batch, 224, 224, 3), dtype=np.uint8)
    ort_rate = rate(lambda v: sess.run(None, {"pixels": v}), x, a.repeats)
    adapter = InputAdapter(bb.spec.preprocess)
    with torch.inference_mode():
        torch_rate = rate(lambda v: bb.model.forward_features(adapter(torch.from_numpy(v))), x, a.repeats)
    print(f"batch {a.batch}: onnxruntime {ort_rate:.1f} photos/s, torch eager {torch_rate:.1f} photos/s, "
          f"ratio {ort_rate / torch_rate:.1f}x")


if __name__ == "__main__":
    main()
