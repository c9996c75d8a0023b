"""Opt-in review samples on a real `bentoml serve`: off by default, bounded in count, each photo with
its answers, listed by `extendserve review`, and a folder made of them trains a head."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes, run_cli, synthetic_photo
from test_service import Server


def noise(seed: int) -> bytes:
    return jpeg_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (240, 320, 3), np.uint8)))


def test_review_samples_are_bounded_listed_and_train_a_head(built_model, tmp_path):
    review = tmp_path / "review"
    s = Server(built_model, log_dir=tmp_path, EXTENDSERVE_WORKERS="1", EXTENDSERVE_REVIEW_DIR=str(review),
               EXTENDSERVE_REVIEW_SHARE="1", EXTENDSERVE_REVIEW_MAX_PHOTOS="5")
    try:
        for i in range(8):  # answered 'unknown' (min_score 1): every one a candidate, five kept
            status, body = s.post("/classify", [("image", noise(i), "../../etc/evil\nname.jpg"), ("min_score", "1", None)])
            assert status == 200 and body["predictions"][0]["label"] == "unknown"
        status, body = s.post("/classify", [("image", jpeg_bytes(synthetic_photo(0, 77)), "d.jpg"), ("min_score", "0", None)])
        assert status == 200 and body["predictions"][0]["score"] > 0.5  # sure: not kept
    finally:
        s.stop()
    photos = sorted(p for p in review.iterdir() if p.suffix == ".jpg")
    assert len(photos) == 5 and all(p.with_suffix(".json").is_file() for p in photos)
    assert not any("evil" in p.name for p in review.iterdir())  # our names, never the client's
    kept = json.loads(photos[0].with_suffix(".json").read_text())
    assert kept["answers"][0]["label"] == "unknown" and kept["why"] == "unknown"
    r = run_cli("review", str(review), "-o", str(tmp_path / "review.html"))
    assert "5 photos kept for review" in r.stdout and r.stdout.count("unknown") >= 5
    assert (tmp_path / "review.html").read_text().count("<img") == 5
    data = tmp_path / "data"  # a class folder made from them goes straight into train-head
    (data / "noise").mkdir(parents=True)
    for p in photos:
        shutil.copy(p, data / "noise" / p.name)
    (data / "discs").mkdir()
    for i in range(5):
        synthetic_photo(0, 300 + i).save(data / "discs" / f"{i}.jpg")
    run_cli("train-head", str(data), "-o", str(tmp_path / "h.pt"))
    assert (tmp_path / "h.pt").is_file()


def test_an_unwritable_review_folder_stops_the_start(built_model, tmp_path):
    with pytest.raises(RuntimeError, match="EXTENDSERVE_REVIEW_DIR=/proc/review: cannot write there"):
        Server(built_model, log_dir=tmp_path, EXTENDSERVE_WORKERS="1", EXTENDSERVE_REVIEW_DIR="/proc/review")
