"""The Python API a notebook uses: train_head and build as the commands run them, and
Model.predict on a PIL image, an array, bytes or a path, all giving the served answer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from extendserve.api import build, train_head
from extendserve.errors import BadImageError, ExtendserveError
from extendserve.serving.runtime import Model

from conftest import synthetic_photo


def test_train_build_predict_from_python(synthetic_data, tmp_path):
    head = train_head(synthetic_data, tmp_path / "shapes.pt", holdout=0, epochs=20)
    assert head.path == tmp_path / "shapes.pt" and head.path.is_file()
    assert set(head["classes"]) == {"red discs", "blue stripes"}  # the figures, by class name
    assert head["classes"]["red discs"]["photos"] == 6 and "strangers_named" in head["classes"]["red discs"]
    model_dir = build(tmp_path / "m", new_heads=[head], no_store=True)
    model = Model(model_dir)
    photo = synthetic_photo(0, 4242)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=95)
    (tmp_path / "p.jpg").write_bytes(buf.getvalue())
    decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # every form below is the same photo
    answers = model.predict([decoded, np.asarray(decoded), buf.getvalue(), str(tmp_path / "p.jpg")], k=2)
    assert [a[0].label for a in answers] == ["red discs"] * 4
    assert all(abs(a[0].score - answers[0][0].score) < 1e-6 for a in answers)
    served = model.predict_files([str(tmp_path / "p.jpg")], 2)[0]["predictions"]
    assert served == [p.to_dict() for p in answers[3]]


def test_api_errors_are_raised_not_exits(built_model, tmp_path):
    model = Model(built_model)
    with pytest.raises(BadImageError, match="H x W x 3 uint8"):
        model.predict([np.zeros((8, 8), np.float32)])
    with pytest.raises(ExtendserveError, match="unrecognized arguments: --epochz 3"):
        train_head(tmp_path, tmp_path / "h.pt", epochz=3)
    with pytest.raises(ExtendserveError, match="no model extendserve-nothing-here:latest in the BentoML model store"):
        build(tmp_path / "x", from_model="extendserve-nothing-here:latest")
