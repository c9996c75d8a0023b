"""Write the built-in backbones' backgrounds: pooled features of ../shared/data/imagenet-sample.

A background is the base's world as its features see it: one [D] vector of channel means per
everyday photo (200 ImageNet photos, one for every fifth class), stored in float16. The photos
themselves are not shipped and cannot be recovered from these means; they ship as a base's
data, as its weights do. Usage: python tools/make_background.py [BACKBONE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from extendserve.bases.base import builtin_base
from extendserve.bases.pretrained import load_backbone
from extendserve.bases.registry import names
from extendserve.bases.world import background_path
from extendserve.training.features import FeatureExtractor

SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenet-sample"


def main() -> None:
    files = sorted(p for p in SAMPLE.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    for name in sys.argv[1:] or names():
        base = builtin_base(load_backbone(name))
        feats, ok, _ = FeatureExtractor(base).extract(files)
        path = background_path(base)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, features=feats[:, 0].astype(np.float16), digest=np.array(base.digest),
                            source=np.array(f"{len(ok)} photos of imagenet-sample (one per fifth ImageNet class), "
                                            "centre crop"))
        print(f"{name}: {len(ok)} photos -> {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
