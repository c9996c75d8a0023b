"""The views train-head computes features of, and an older cache's entries read for them."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from extendserve.bases.base import builtin_base
from extendserve.bases.pretrained import load_backbone
from extendserve.heads.checks import COPY_VIEWS
from extendserve.photos.views import VIEWS, photo_views
from extendserve.training.features import V3_KEPT, FeatureCache, FeatureExtractor

from conftest import jpeg_bytes, synthetic_photo


def test_eight_views_centre_first_and_copies_read_by_name():
    base = builtin_base(load_backbone())
    v = photo_views(jpeg_bytes(synthetic_photo(0, 5)), "p.jpg", base.preprocess)
    assert v.shape[0] == len(VIEWS) == 8 and VIEWS[0] == "center"
    assert np.array_equal(v[1], v[0][:, ::-1]) and np.array_equal(v[VIEWS.index("full-flip")], v[VIEWS.index("full")][:, ::-1])
    assert [VIEWS[i] for i in COPY_VIEWS] == ["center", "center-flip", "full", "full-flip"]


def test_a_version_3_cache_entry_gives_the_eight_views_without_the_model(tmp_path):
    """A cache made before the corners' mirror images were dropped is read, not recomputed."""
    base = builtin_base(load_backbone())
    photo = tmp_path / "p.jpg"
    photo.write_bytes(jpeg_bytes(synthetic_photo(1, 9)))
    fresh, _, _ = FeatureExtractor(base, tmp_path / "fresh").extract([photo])
    pre = hashlib.sha256(json.dumps(base.identity()["preprocess"], sort_keys=True).encode()).hexdigest()[:16]
    key = f"{base.name}-{base.digest[:16]}"
    old = FeatureCache(tmp_path / "old" / "features" / key / f"views-v3-{pre}", f"{key}/{base.digest}/3/{pre}",
                       (12, base.feature_dim))
    twelve = np.zeros((12, base.feature_dim), np.float32)
    twelve[list(V3_KEPT)] = fresh[0]
    twelve[[6, 7, 8, 9]] = 7.0  # the corners' flips: must not be read
    old.put(old.key(photo.read_bytes()), twelve)
    fx = FeatureExtractor(base, tmp_path / "old")
    fx._session = "no model run is allowed here"  # a recomputation would fail on this
    got, ok, hits = fx.extract([photo])
    assert hits == 1 and ok == [0] and np.array_equal(got[0], fresh[0])
    _, _, again = FeatureExtractor(base, tmp_path / "old").extract([photo])  # now a version 4 entry
    assert again == 1 and any((tmp_path / "old" / "features" / key).glob("views-v4-*/*.npz"))
