"""The calibrated head against the naive recipe: synthetic always, shared photos when present."""

import json

import numpy as np
import pytest

from extendserve.backbone import load_backbone
from extendserve.calibrate import choose_threshold, loo_similarities
from extendserve.train import TrainSettings, score_features, train_head

from conftest import CELEBS, IMAGENET_SAMPLE, needs_shared, run_cli


def test_gated_formula_places_new_classes_by_gate():
    """Synthetic features: inside the gate the best new class beats every ImageNet logit, outside it loses."""
    rng = np.random.default_rng(0)
    d = 1280
    centres = rng.normal(0, 1, (2, d)).clip(0) + 0.5
    feats = np.stack([centres[i % 2] + rng.normal(0, 0.05, (12, d)) for i in range(16)]).astype(np.float32)
    labels = np.arange(16) % 2
    bb = load_backbone()
    head, _ = train_head(bb, feats, labels, ["a", "b"], TrainSettings(epochs=50, holdout=0))
    inside = score_features(bb, head, feats[:4, 0])
    assert (inside.argmax(1) == labels[:4] + 1000).all()
    outside = score_features(bb, head, rng.uniform(0, 3, (8, d)).astype(np.float32))
    assert (outside.argmax(1) < 1000).all()
    # the first 1000 columns are the original logits, untouched
    x = rng.uniform(0, 3, (8, d)).astype(np.float32)
    import torch
    with torch.no_grad():
        original = bb.model.forward_head(torch.from_numpy(x)).numpy()
    assert np.array_equal(score_features(bb, head, x)[:, :1000], original)


def test_threshold_rules():
    pos = np.linspace(0.5, 0.9, 101)
    assert choose_threshold(pos, 0.05, None) == pytest.approx(0.52)
    neg = np.linspace(0.2, 0.6, 101)  # negatives only ever raise the gate
    assert choose_threshold(pos, 0.05, neg) == pytest.approx(np.quantile(neg, 0.99))
    feats = np.ones((3, 12, 4), np.float32)
    assert np.allclose(loo_similarities(feats, np.array([0, 0, 1]), 2), 1.0)


@needs_shared
def test_shared_celebrities_beat_naive_by_far(tmp_path):
    rng = np.random.default_rng(0)
    train, held = tmp_path / "train", tmp_path / "held"
    for person in sorted(p.name for p in CELEBS.iterdir()):
        files = sorted((CELEBS / person).iterdir())
        order = rng.permutation(len(files))
        for dst, idx in ((held, order[:4]), (train, order[4:])):
            (dst / person).mkdir(parents=True)
            for i in idx:
                (dst / person / files[i].name).symlink_to(files[i])
    results = {}
    for method in ("naive", "gated"):
        run_cli("train-head", str(train), "-o", str(tmp_path / f"{method}.pt"), "--method", method, "--holdout", "0")
        run_cli("build", "--new-head", str(tmp_path / f"{method}.pt"), "-o", str(tmp_path / method))
        results[method] = json.loads(run_cli("eval", "--model", str(tmp_path / method), "--new", str(held),
                                             "--imagenet", str(IMAGENET_SAMPLE), "--json").stdout)
    naive, gated = results["naive"], results["gated"]
    assert gated["new"]["accuracy"] >= naive["new"]["accuracy"] + 0.5
    assert gated["imagenet"]["stolen"] <= 0.02
    assert gated["imagenet"]["top1_after"] >= gated["imagenet"]["top1_before"] - 0.02
