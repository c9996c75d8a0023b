"""The base's world: features of everyday photos that are none of the new classes.

A new class must win on its own photos *rather than anything else the base knows*; that can only
be judged against evidence of what else there is. For each built-in backbone the package ships
one: pooled features of 200 ImageNet photos, one for every fifth class (``tools/make_background.py``;
the photos are not shipped, only their channel means, as weights are). A foreign base has none
unless ``--negatives DIR`` gives photos; user negatives are added to a shipped background.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import ExtendserveError
from .base import Base

MIN_BACKGROUND = 20  # fewer photos than this cannot judge a head: it is fitted as if there were none


@dataclass
class Background:
    features: np.ndarray  # [m, D] float32, the centre crop of each photo
    source: str  # what the photos are, for the report and the manifest

    def __len__(self) -> int:
        return len(self.features)

    def without(self, positives: np.ndarray, threshold: float = 0.995) -> Background:
        """Drop background photos that are (near) copies of a new photo: a class trained on
        ImageNet photos must not be judged against those very photos."""
        if not len(self.features) or not len(positives):
            return self
        a = self.features / np.maximum(np.linalg.norm(self.features, axis=1, keepdims=True), 1e-12)
        b = positives / np.maximum(np.linalg.norm(positives, axis=1, keepdims=True), 1e-12)
        keep = (a @ b.T).max(1) < threshold
        return Background(self.features[keep], self.source) if not keep.all() else self


def background_path(base: Base) -> Path:
    """The shipped file for a built-in base's exact weights (another checkpoint has none)."""
    return Path(str(resources.files("extendserve").joinpath(f"data/background/{base.name}-{base.digest[:16]}.npz")))


def shipped_background(base: Base) -> Background | None:
    path = background_path(base)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        feats = z["features"].astype(np.float32)
        if str(z["digest"]) != base.digest or feats.ndim != 2 or feats.shape[1] != base.feature_dim:
            raise ExtendserveError(f"{path}: this background was made for other weights; reinstall extendserve")
        return Background(feats, f"{base.name}'s shipped background: {z['source']}")


def background_for(base: Base, negatives: np.ndarray | None = None) -> Background | None:
    """The shipped background plus the user's negatives (centre crops), or None if neither."""
    parts, names = [], []
    shipped = shipped_background(base)
    if shipped is not None:
        parts.append(shipped.features)
        names.append(shipped.source)
    if negatives is not None and len(negatives):
        parts.append(np.asarray(negatives, np.float32))
        names.append(f"{len(negatives)} photos from --negatives")
    if not parts:
        return None
    return Background(np.concatenate(parts), " + ".join(names))
