"""Nothing trusted that should not be (round 2): concurrent builds, pickle DAG bombs, paths a
manifest names, deeply nested manifests. Real files, real builds, real onnxruntime."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from extendserve.building.manifest import Manifest
from extendserve.errors import ExtendserveError, HeadFileError
from extendserve.heads.head import load_head

from conftest import run_cli, synthetic_photo


def dag(depth: int) -> list:
    x: list = []
    for _ in range(depth):
        x = [x, x]  # each level shares one list twice: a few hundred bytes pickled, 2^depth items as a tree
    return x


@pytest.mark.parametrize("where", ["settings", "classes"])
def test_a_pickle_dag_bomb_head_is_refused_at_once(synthetic_head, tmp_path, where):
    payload = torch.load(synthetic_head, weights_only=True)
    if where == "settings":
        payload["settings"]["note"] = dag(50)
    else:
        payload["classes"] = [dag(50), *payload["classes"][1:]]
    bomb = tmp_path / "bomb.pt"
    torch.save(payload, bomb)
    assert bomb.stat().st_size < synthetic_head.stat().st_size + 5000  # the bomb adds a few hundred bytes
    t0 = time.time()
    with pytest.raises(HeadFileError, match="refused: nested .* deep or over .* items"):
        load_head(bomb)
    r = run_cli("build", "--new-head", str(bomb), "-o", str(tmp_path / "m"), "--no-store", check=False)
    assert r.returncode != 0 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert time.time() - t0 < 60 and not (tmp_path / "m").exists()


def test_a_head_file_with_fields_of_its_own_is_refused(synthetic_head, tmp_path):
    payload = torch.load(synthetic_head, weights_only=True)
    payload["run_me"] = "x"
    torch.save(payload, tmp_path / "extra.pt")
    with pytest.raises(HeadFileError, match="holds no run_me"):
        load_head(tmp_path / "extra.pt")


def test_the_head_digest_covers_its_settings(synthetic_head, tmp_path):
    """A head inside a model whose settings were changed after the build is refused by build --from."""
    run_cli("build", "--new-head", str(synthetic_head), "-o", str(tmp_path / "m"), "--no-store")
    inside = tmp_path / "m" / "heads" / "shapes.pt"
    payload = torch.load(inside, weights_only=True)
    payload["settings"]["max_taken"] = 0.5
    os.chmod(inside, 0o644)
    torch.save(payload, inside)
    r = run_cli("build", "--from", str(tmp_path / "m"), "--new-head", str(synthetic_head), "-o", str(tmp_path / "m2"),
                "--name", "m2", "--no-store", check=False)
    assert r.returncode != 0 and "changed since" in r.stderr


def test_build_from_reads_no_file_outside_the_model(built_model, tmp_path, synthetic_head):
    """A legacy-style head entry (no file inside the model) naming /etc/passwd or a real head file
    outside the model: neither is read."""
    for named in ("/etc/passwd", str(synthetic_head)):
        m = tmp_path / f"legacy-{len(named)}"
        shutil.copytree(built_model, m)
        d = json.loads((m / "manifest.json").read_text())
        d["heads"][1]["file"] = None
        d["settings"]["new_head"] = [named]
        (m / "manifest.json").write_text(json.dumps(d))
        r = run_cli("build", "--from", str(m), "--drop-head", "nothing", "-o", str(tmp_path / "out"), check=False)
        assert r.returncode != 0
        r = run_cli("build", "--from", str(m), "--new-head", str(synthetic_head), "-o", str(tmp_path / "out"),
                    "--name", "out", "--no-store", check=False)
        assert r.returncode != 0 and "outside the model folder" in r.stderr, r.stderr
        assert "looks like text" not in r.stderr  # the file was never opened


def test_a_deeply_nested_manifest_is_a_one_line_error(built_model, tmp_path):
    """In a folder, and in another version of a store model: predict says so in one line, and the
    store's other versions still serve."""
    import bentoml

    from extendserve.building.store import save_to_store

    from conftest import jpeg_bytes, synthetic_photo

    photo = tmp_path / "disc.jpg"
    photo.write_bytes(jpeg_bytes(synthetic_photo(0, 5)))
    m = tmp_path / "deep"
    shutil.copytree(built_model, m)
    d = json.loads((m / "manifest.json").read_text())
    deep = (json.dumps(d)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    (m / "manifest.json").write_bytes(deep)
    with pytest.raises(ExtendserveError, match="unreadable manifest"):
        Manifest.read(m / "manifest.json")
    r = run_cli("predict", "--model", str(m), str(photo), check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "unreadable manifest" in r.stderr
    old_tag, _ = save_to_store(built_model, "deep-manifest")
    with open(bentoml.models.get(old_tag).path_of("manifest.json"), "wb") as f:
        f.write(deep)
    r = run_cli("predict", "--model", old_tag, str(photo), check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "manifest" in r.stderr
    new_tag = save_to_store(built_model, "deep-manifest")[0]
    r = run_cli("predict", "--model", new_tag, str(photo), check=False)
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr


def test_a_second_build_into_the_same_folder_or_name_is_refused(synthetic_head, tmp_path):
    """While one build holds the folder (or the store name), another is refused with a message and
    writes nothing."""
    from extendserve.building.publish import build_lock, output_dir

    out = tmp_path / "m"
    with build_lock(output_dir(out), "extendserve-samename"):
        r = run_cli("build", "--new-head", str(synthetic_head), "-o", str(out), "--name", "other", check=False)
        assert r.returncode != 0 and "another build is writing -o" in r.stderr and not out.exists()
        r = run_cli("build", "--new-head", str(synthetic_head), "-o", str(tmp_path / "n"), "--name", "samename",
                    check=False)
        assert r.returncode != 0 and "another build is writing the store model extendserve-samename" in r.stderr
    with build_lock(output_dir(out), "extendserve-samename"):  # the lock went with the one that held it
        assert not list(tmp_path.iterdir())  # refused builds wrote nothing, and no lock file lies here


def test_a_store_version_holds_the_bytes_its_build_verified(synthetic_head, tmp_path):
    """The store version is written from the verified bytes, not the folder read back: a folder
    replaced between the two (as a second build once did) does not leak into the printed tag."""
    import bentoml

    from extendserve.building.build import BuiltModel
    from extendserve.building.publish import publish, write_model_dir

    run_cli("build", "-o", str(tmp_path / "plain"), "--no-store")
    run_cli("build", "--new-head", str(synthetic_head), "-o", str(tmp_path / "m"), "--no-store")
    folder = tmp_path / "m"
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    built = BuiltModel(files["model.onnx"], Manifest.from_bytes(files["manifest.json"]),
                       {k: v for k, v in files.items() if k.startswith("heads/")})
    other = {p.name: p.read_bytes() for p in (tmp_path / "plain").iterdir() if p.is_file()}

    import extendserve.building.publish as pub

    real = pub.write_model_dir

    def then_another_build(final, fs):  # the other build swaps its folder in right after this one's
        real(final, fs)
        write_model_dir(final, other)

    pub.write_model_dir = then_another_build
    try:
        tag, _ = publish(built, pub.output_dir(folder), "verified-bytes")
    finally:
        pub.write_model_dir = real
    m = bentoml.models.get(tag)
    assert open(m.path_of("model.onnx"), "rb").read() == files["model.onnx"]
    assert open(m.path_of("manifest.json"), "rb").read() == files["manifest.json"]
    assert os.path.isfile(m.path_of("heads/shapes.pt"))


def test_a_manifest_whose_labels_differ_from_the_model_is_refused(built_model, tmp_path):
    from extendserve.serving.runtime import Model

    m = tmp_path / "relabelled"
    shutil.copytree(built_model, m)
    d = json.loads((m / "manifest.json").read_text())
    d["labels"][-1] = "planted label"
    (m / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ExtendserveError, match="labels are not the ones inside model.onnx"):
        Model(m)


def test_a_planted_pinned_copy_is_never_served_and_a_read_only_cache_still_starts(built_model, tmp_path):
    """The cache cannot be written (EXTENDSERVE_CACHE under /proc, unwritable even for root): the
    service once fell back to $TMPDIR/extendserve-served-$UID/<sha> and served whatever folder was
    there (another user's, with changed labels), or did not start at all."""
    import tempfile

    from extendserve.building.manifest import read_model_dir

    from test_service import Server, disc

    sha = read_model_dir(built_model)[0].model_sha256
    planted = Path(tempfile.gettempdir()) / f"extendserve-served-{os.getuid()}" / sha
    shutil.rmtree(planted, ignore_errors=True)
    shutil.copytree(built_model, planted)
    d = json.loads((planted / "manifest.json").read_text())
    d["labels"] = [f"planted {i}" for i in range(len(d["labels"]))]
    (planted / "manifest.json").write_text(json.dumps(d))
    try:
        s = Server(built_model, tmp_path, EXTENDSERVE_CACHE="/proc/extendserve-read-only", EXTENDSERVE_WORKERS="1")
        try:
            status, body = s.post("/classify", [("image", disc(), "disc.jpg")])
            assert status == 200 and body["predictions"][0]["label"] == "red discs", body
        finally:
            s.stop()
    finally:
        shutil.rmtree(planted, ignore_errors=True)


@pytest.mark.parametrize("how", ["--model", "build --from"])
def test_a_store_tag_with_dot_dot_touches_nothing_outside_the_store(tmp_path, how):
    """``--model 'extendserve-default/../../../victim:latest'`` once removed every folder of victim/
    without a model.yaml (the broken-version sweep joined the name onto the store's path before
    BentoML checked the tag). The tag is checked first now; nothing outside the store is touched."""
    home = Path(os.environ["BENTOML_HOME"])
    victim = home.parent / "victim"
    (victim / "my-project" / "src").mkdir(parents=True, exist_ok=True)
    (victim / "my-project" / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (victim / "empty-folder").mkdir(exist_ok=True)
    for p in [victim / "my-project" / "src" / "main.c", victim / "my-project" / "src", victim / "my-project",
              victim / "empty-folder"]:
        os.utime(p, (time.time() - 3600, time.time() - 3600))  # not "being saved": the old sweep took them
    tag = "extendserve-default/../../../victim:latest"
    synthetic_photo(0, 1).save(tmp_path / "x.png")
    args = ["predict", "--model", tag, str(tmp_path / "x.png")] if how == "--model" else [
        "build", "--from", tag, "-o", str(tmp_path / "m"), "--no-store"]
    r = run_cli(*args, check=False)
    assert r.returncode != 0 and "not a model store tag" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert ("--model" if how == "--model" else "--from") in r.stderr and "EXTENDSERVE_MODEL=" not in r.stderr
    assert (victim / "my-project" / "src" / "main.c").is_file() and (victim / "empty-folder").is_dir()
