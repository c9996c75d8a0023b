"""The views of a photo train-head computes features of: view 0 exactly what the served model
sees, the rest the training augmentation (mirrored, corners, the whole photo). eval's near-copy
test reads some of them too, so they live with the photos, below both."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..config import PreprocessConfig
from .preprocess import center_crop, decode, resize_shorter

# View 0 is exactly what the served model sees; the rest are the training augmentation. The corners'
# mirror images were views too until 2026-12-07: without them a third less to compute, and over 8
# random splits of every shared set the same held-out accuracy (docs/quality.md).
VIEWS = ("center", "center-flip", "tl", "tr", "bl", "br", "full", "full-flip")


def views(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The VIEWS of one photo as uint8 [len(VIEWS), crop, crop, 3]."""
    c = cfg.crop
    big = resize_shorter(im, cfg.resize, cfg.interpolation)
    center = center_crop(big, c)
    if big.shape[0] < c or big.shape[1] < c:
        big = center_crop(big, max(c, *big.shape[:2]))
    H, W = big.shape[:2]
    corners = [big[:c, :c], big[:c, W - c :], big[H - c :, :c], big[H - c :, W - c :]]
    full = center_crop(resize_shorter(im, c, cfg.interpolation), c)
    out = [center, center[:, ::-1], *corners, full, full[:, ::-1]]
    return np.ascontiguousarray(np.stack(out))


def photo_views(data: bytes, source: str, cfg: PreprocessConfig) -> np.ndarray:
    """Photo bytes -> its VIEWS, decoded as the served path decodes (see preprocess.decode)."""
    return views(decode(data, source, cfg.resize), cfg)
