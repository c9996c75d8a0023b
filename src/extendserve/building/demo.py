"""The demo model: ImageNet plus two well-known people, from photos that ship inside PyPI packages
(matplotlib's ``grace_hopper.jpg``, scikit-image's ``astronaut.png``: astronaut Eileen Collins),
so ``make serve`` shows the product with no user data and no download."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ExtendserveError

# class name -> (package, file inside the package)
DEMO_CLASSES = {
    "Grace Hopper (demo)": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "Eileen Collins (demo)": ("skimage", "data/astronaut.png"),
}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def demo_photos() -> dict[str, Path]:
    """The demo photos that are installed (the ``demo`` extra brings both)."""
    found = {}
    for cls, (pkg, rel) in DEMO_CLASSES.items():
        d = _package_dir(pkg)
        if d is not None and (d / rel).is_file():
            found[cls] = d / rel
    return found


def build_demo() -> Any:
    """Train the demo head (one photo a class, augmented) and build ImageNet + demo (a
    ``build.BuiltModel``, to publish)."""
    import numpy as np

    from ..bases.base import builtin_base
    from ..bases.pretrained import load_backbone
    from ..bases.world import background_for
    from ..photos.preprocess import prepare_file
    from ..training.features import FeatureExtractor
    from ..training.train import TrainSettings, train_head
    from .build import build_model

    photos = demo_photos()
    if len(photos) < len(DEMO_CLASSES):
        raise ExtendserveError(
            "the demo photos ship in matplotlib and scikit-image; install them: "
            "pip install -e '.[demo]'"
        )
    base = builtin_base(load_backbone())
    with tempfile.TemporaryDirectory() as tmp:
        classes = list(photos)
        files = []
        for cls, src in photos.items():
            dst = Path(tmp) / cls / src.name
            dst.parent.mkdir(parents=True)
            shutil.copy(src, dst)
            files.append(dst)
        feats, ok, _ = FeatureExtractor(base).extract(files)
        head, _ = train_head(base, feats, np.arange(len(classes))[ok], classes,
                             TrainSettings(holdout=0.0), background=background_for(base))
    head.name = "demo"
    head.source = "demo photos from matplotlib and scikit-image"
    real = [prepare_file(p, base.preprocess) for p in photos.values()]
    return build_model(base, [head], real_inputs=real, settings={"demo": True})
