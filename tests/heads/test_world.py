"""The calibrated head knows the world it joins: broad classes, scores, warnings, verification."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from extendserve.bases.base import PIXELS, builtin_base
from extendserve.bases.pretrained import load_backbone
from extendserve.bases.world import background_for, shipped_background
from extendserve.building.merge import merged_model, wire
from extendserve.building.verify import verification_inputs, verify
from extendserve.heads.scoring import FLOOR
from extendserve.photos.preprocess import prepare_file
from extendserve.serving.runtime import Model, softmax
from extendserve.sessions import make_session
from extendserve.training.features import FeatureExtractor
from extendserve.training.train import TrainSettings, score_features, train_head

from conftest import IMAGENET_SAMPLE, SHARED, needs_shared, run_cli

DOGS = range(151, 269)  # ImageNet's dog classes


@pytest.fixture(scope="module")
def base():
    return builtin_base(load_backbone())


def centre_features(base, files) -> np.ndarray:
    sess = make_session(base.adapted(["features"]).SerializeToString(), "cpu")
    px = np.stack([prepare_file(f, base.preprocess) for f in files])
    return np.concatenate([sess.run(None, {PIXELS: px[i:i + 32]})[0] for i in range(0, len(px), 32)])


def sample_by_kind():
    from extendserve.bases.imagenet import synset_index

    files = sorted(IMAGENET_SAMPLE.iterdir())
    dogs = [f for f in files if synset_index(f.name.split("_")[0]) in DOGS]
    return dogs, [f for f in files if f not in dogs]


def test_every_builtin_backbone_ships_its_background():
    from extendserve.bases.registry import names

    for name in names():
        b = builtin_base(load_backbone(name))
        bg = shipped_background(b)
        assert bg is not None and len(bg) == 200 and bg.features.shape[1] == b.feature_dim
        assert np.isfinite(bg.features).all() and bg.features.min() >= 0  # pooled ReLU6 activations


@needs_shared
def test_a_broad_class_does_not_take_the_other_shared_photos(base, tmp_path):
    """Ten dogs of ten breeds as one class: at most 1% of every other shared photo (other ImageNet
    kinds, faces, hand signs, garments) named as it; the old top-1 on them within 1 point."""
    dogs, others = sample_by_kind()
    feats, ok, _ = FeatureExtractor(base).extract(dogs[:10])
    head, report = train_head(base, feats, np.zeros(len(ok), np.int64), ["office dog"], TrainSettings(),
                              background=background_for(base))
    elsewhere = [p for d in ("celebs/train", "signs", "clothes") for p in sorted((SHARED / d).rglob("*"))
                 if p.is_file()][::4]
    x = centre_features(base, others + elsewhere)
    merged = score_features(base, head, x)
    taken = (merged.argmax(1) >= 1000).mean()
    assert taken <= 0.01, f"{taken:.1%} of {len(x)} other photos taken"
    inet = merged[: len(others)]
    assert (inet.argmax(1) == inet[:, :1000].argmax(1)).mean() >= 0.99
    # its own breeds, unseen, are mostly still dogs: the class did not collapse to nothing
    assert report.heldout is not None and "background_taken" in report.heldout


def _assert_base_scores_where_no_new_class(logits: np.ndarray, scores: np.ndarray) -> None:
    base_p = softmax(logits[:, :1000])
    far = np.log(scores[:, 1000:].sum(1) / scores[:, :1000].sum(1)) < FLOOR  # no new class applies
    assert far.mean() >= 0.9, f"only {far.mean():.0%} of everyday photos are far from the new classes"
    assert np.abs(scores[far, :1000] - base_p[far]).max() <= 1e-6
    assert (np.argsort(-scores[:, :1000], 1)[:, :20] == np.argsort(-base_p, 1)[:, :20]).all()
    assert np.allclose(scores.sum(1), 1.0, atol=1e-5)


def test_old_scores_are_the_base_softmax_on_the_background(base, synthetic_head):
    """The base's own world (its shipped background, in the package) through the head's scorer:
    where no new class applies, each ImageNet score is the base's softmax within 1e-6."""
    from extendserve.heads.head import load_head

    merged = score_features(base, load_head(synthetic_head), shipped_background(base).features)
    e = np.exp(merged - merged.max(1, keepdims=True).astype(np.float64))
    _assert_base_scores_where_no_new_class(merged, e / e.sum(1, keepdims=True))


@needs_shared
def test_old_scores_are_the_base_softmax_in_the_built_model(built_model):
    """The built model's own scores output on the ImageNet sample photos: the same, in onnxruntime."""
    model = Model(built_model)
    px = np.stack([prepare_file(f, model.preprocess) for f in sorted(IMAGENET_SAMPLE.iterdir())])
    _assert_base_scores_where_no_new_class(model.logits(px), model.logits(px, scores=True))


def test_verification_covers_the_scores_output(base, built_model, synthetic_head):
    """A merged model whose scores are not the softmax of its logits fails verification."""
    from extendserve.heads.head import load_head

    heads = [load_head(synthetic_head)]
    wiring = wire(base, heads)
    model = merged_model(base, heads, wiring)
    inputs = verification_inputs(base.input_size)
    assert verify(model.SerializeToString(), base, heads, wiring, inputs)["passed"]
    for n in model.graph.node:
        if n.output[0] == "scores":
            n.op_type = "Identity"  # scores = logits: not probabilities
            del n.attribute[:]
    onnx.checker.check_model(model)
    check = verify(model.SerializeToString(), base, heads, wiring, inputs)
    assert not check["passed"] and check["scores_vs_softmax_of_logits"] > 1e-3


@needs_shared
def test_a_head_that_takes_the_world_is_reported(tmp_path):
    """The joint recipe on a broad class takes ImageNet: train-head and build say so, with the fix."""
    dogs, _ = sample_by_kind()
    (tmp_path / "data" / "office dog").mkdir(parents=True)
    for f in dogs[:10]:
        (tmp_path / "data" / "office dog" / f.name).symlink_to(f)
    r = run_cli("train-head", str(tmp_path / "data"), "-o", str(tmp_path / "h.pt"), "--method", "joint")
    assert "WARNING: this head names" in r.stderr and "--negatives" in r.stderr
    b = run_cli("build", "--new-head", str(tmp_path / "h.pt"), "-o", str(tmp_path / "m"), "--no-store")
    assert "WARNING: head h names" in b.stderr
    import re

    figure = re.search(r"background taken: this head names ([0-9.]+%) of (\d+)", r.stdout).groups()
    assert re.search(r"background taken: it names ([0-9.]+%) of (\d+)", b.stdout).groups() == figure  # one figure
    import json

    meta = json.loads((tmp_path / "m" / "manifest.json").read_text())["heads"][1]
    assert meta["background_taken"] > 0.01 and meta["heldout"]["background_taken"] > 0.01


def test_classes_made_of_the_background_photos_train_with_a_warning(base):
    """Classes whose photos are the shipped background's own (ImageNet sample photos as one-photo
    classes): every background photo is a near-copy of a training photo, so the head trains with
    none and says so, rather than failing on an empty background."""
    bg = shipped_background(base)
    n = 60
    feats = np.repeat(bg.features[:n, None, :], 2, axis=1)  # two identical views a photo
    head, report = train_head(base, feats, np.arange(n), [f"c{i}" for i in range(n)], TrainSettings(holdout=0),
                              background=bg_of(bg, n))
    assert head.settings["background"] is None and len(head.classes) == n
    assert report.warnings and "near-copies of your training photos" in report.warnings[0]
    assert "--negatives" in report.warnings[0]


def bg_of(bg, n: int):
    from extendserve.bases.world import Background

    return Background(bg.features[:n], bg.source)  # only copies of the training photos: none left to judge by
