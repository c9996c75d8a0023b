"""Growing a model over time: heads travel inside the model (heads/NAME.pt, no machine paths in
the manifest), so a class is added to a model in the store after its head files are gone; heads
are dropped by name; store tags work wherever a model is named; an identical rebuild keeps the
store's version. Real builds, a real BentoML store (the tests' own BENTOML_HOME)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bentoml
import pytest

from extendserve.building.store import resolve
from extendserve.errors import ExtendserveError
from extendserve.heads.head import load_head
from extendserve.serving.runtime import Model

from conftest import run_cli, synthetic_photo


def renamed_head(src: Path, dst: Path, name: str, prefix: str) -> Path:
    """Another head: the same rows under other class names (names must be unique across heads)."""
    h = load_head(src)
    h.name, h.classes = name, [f"{prefix} {c}" for c in h.classes]
    h.save(dst)
    return dst


def versions(name: str) -> list[str]:
    return sorted(str(m.tag) for m in bentoml.models.list(name))


def test_a_class_is_added_to_a_stored_model_after_its_head_files_are_gone(synthetic_head, tmp_path):
    first = Path(shutil.copy(synthetic_head, tmp_path / "shapes.pt"))
    run_cli("build", "--new-head", str(first), "-o", str(tmp_path / "m1"), "--name", "grow")
    first.unlink()  # the user moved it away
    extra = renamed_head(synthetic_head, tmp_path / "extra.pt", "extra", "more")
    r = run_cli("build", "--from", "extendserve-grow:latest", "--new-head", str(extra), "-o", str(tmp_path / "m2"))
    assert "kept shapes; added extra" in r.stdout
    grown = Model(tmp_path / "m2")
    base = Model(tmp_path / "m1")
    assert grown.labels == base.labels + [f"more {c}" for c in base.labels[1000:]]
    assert [h.name for h in grown.manifest.heads] == ["imagenet", "shapes", "extra"]
    assert len(versions("extendserve-grow")) == 2  # the grown model is the name's next version
    # the model carries its heads under relative names, and the manifest no path of this machine
    text = (tmp_path / "m2" / "manifest.json").read_text()
    assert str(tmp_path) not in text and "/tmp/" not in text
    assert sorted(p.name for p in (tmp_path / "m2" / "heads").iterdir()) == ["extra.pt", "shapes.pt"]
    assert [h.file for h in grown.manifest.new_heads] == ["heads/shapes.pt", "heads/extra.pt"]
    extra.unlink()
    # --drop-head gives back the first model, to the byte; from a folder, without the store
    r = run_cli("build", "--from", str(tmp_path / "m2"), "--drop-head", "extra", "-o", str(tmp_path / "m3"), "--no-store")
    assert "dropped extra" in r.stdout
    assert (tmp_path / "m3" / "model.onnx").read_bytes() == (tmp_path / "m1" / "model.onnx").read_bytes()
    r = run_cli("build", "--from", str(tmp_path / "m2"), "--drop-head", "nope", "-o", str(tmp_path / "m4"), check=False)
    assert r.returncode == 2 and "has no head of that name" in r.stderr and "shapes, extra" in r.stderr
    assert not (tmp_path / "m4").exists()


def test_identical_rebuild_keeps_the_store_version(synthetic_head, tmp_path):
    run_cli("build", "--new-head", str(synthetic_head), "-o", str(tmp_path / "a"), "--name", "twice")
    before = versions("extendserve-twice")
    r = run_cli("build", "--new-head", str(synthetic_head), "-o", str(tmp_path / "b"), "--name", "twice")
    assert "kept it, no new version saved" in r.stdout and before[0] in r.stdout
    assert versions("extendserve-twice") == before
    r = run_cli("build", "--from", "extendserve-twice:latest", "-o", str(tmp_path / "c"))
    assert "byte-identical" in r.stdout and versions("extendserve-twice") == before
    # a different model under the same name is a new version
    other = renamed_head(synthetic_head, tmp_path / "o.pt", "other", "other")
    run_cli("build", "--new-head", str(other), "-o", str(tmp_path / "d"), "--name", "twice")
    assert len(versions("extendserve-twice")) == 2


def test_predict_and_eval_take_a_store_tag(tmp_path):
    """extendserve-twice (the test above) serves as the stored model."""
    photo = tmp_path / "p.jpg"
    synthetic_photo(0, 99).save(photo)
    by_tag = run_cli("predict", "--model", "extendserve-twice:latest", str(photo), "--json")
    by_dir = run_cli("predict", "--model", str(resolve("extendserve-twice:latest")[1]), str(photo), "--json")
    assert json.loads(by_tag.stdout)[0]["predictions"] == json.loads(by_dir.stdout)[0]["predictions"]
    (tmp_path / "imagenet").mkdir()
    synthetic_photo(1, 5).save(tmp_path / "imagenet" / "n01440764_0.JPEG")
    r = run_cli("eval", "--model", "extendserve-twice", "--imagenet", str(tmp_path / "imagenet"), "--json")
    assert json.loads(r.stdout)["imagenet"]["photos"] == 1
    # a bare name is not guessed, but the hint names the tag meant, as a command that works
    r = run_cli("predict", "--model", "twice", str(photo), check=False)
    assert r.returncode == 2 and "did you mean extendserve-twice:latest" in r.stderr
    r = run_cli("predict", "--model", "extendserve-missing:latest", str(photo), check=False)
    assert r.returncode == 2 and "extendserve build --new-head HEAD.pt -o models/missing" in r.stderr


def test_a_missing_store_model_hint_names_the_tag_meant():
    """EXTENDSERVE_MODEL=twice: the service's resolve names extendserve-twice:latest."""
    with pytest.raises(ExtendserveError, match="did you mean extendserve-twice:latest"):
        resolve("twice")
    assert resolve("extendserve-twice:latest")[1].is_dir()
