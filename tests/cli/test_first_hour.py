"""The first hour as a user: every mistake on the command line answered, nothing ignored silently."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from extendserve.bases.registry import names

from conftest import ROOT, run_cli, synthetic_photo


@pytest.mark.parametrize("per_class", [1, 2])
def test_one_or_two_photos_a_class_train_build_and_verify(tmp_path, per_class):
    root = tmp_path / "photos"
    for kind, name in enumerate(["discs", "stripes"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            synthetic_photo(kind, 70 * kind + i).save(root / name / f"{i}.jpg", quality=90)
    run_cli("train-head", str(root), "-o", str(tmp_path / "h.pt"))
    run_cli("build", "--new-head", str(tmp_path / "h.pt"), "-o", str(tmp_path / "m"), "--no-store")
    v = json.loads((tmp_path / "m" / "manifest.json").read_text())["verification"]
    assert v["base_identical"]


def test_a_phone_sized_jpeg_is_trained_on_and_one_class_is_warned_about(tmp_path):
    from test_preprocess import phone_jpeg

    root = tmp_path / "photos"
    (root / "discs").mkdir(parents=True)
    (root / "discs" / "phone.jpg").write_bytes(phone_jpeg())  # 9000x9000: decoded at 1/8, not skipped
    synthetic_photo(0, 3).save(root / "discs" / "small.jpg")
    r = run_cli("train-head", str(root), "-o", str(tmp_path / "h.pt"))
    assert "skipped" not in r.stderr and "discs" in r.stdout and re.search(r"^ +2 .* discs$", r.stdout, re.M), r.stdout
    assert "WARNING: one class" in r.stderr and "--negatives" in r.stderr


def test_photos_beside_the_class_folders_are_reported(tmp_path):
    root = tmp_path / "photos"
    for kind, name in enumerate(["discs", "stripes"]):
        (root / name).mkdir(parents=True)
        synthetic_photo(kind, kind).save(root / name / "0.jpg")
    synthetic_photo(0, 9).save(root / "loose.jpg")
    r = run_cli("train-head", str(root), "-o", str(tmp_path / "h.pt"), "--holdout", "0")
    assert "loose.jpg" in r.stderr and "belongs to no class" in r.stderr


def test_eval_needs_something_to_evaluate(built_model, tmp_path):
    r = run_cli("eval", "--model", str(built_model), check=False)
    assert r.returncode == 2 and "--new" in r.stderr and "--imagenet" in r.stderr
    flat = tmp_path / "flat"
    flat.mkdir()
    synthetic_photo(0, 1).save(flat / "a.jpg")
    r = run_cli("eval", "--model", str(built_model), "--new", str(flat), check=False)
    assert r.returncode == 2 and "no class folders" in r.stderr


def test_predict_top_k_zero_refused(built_model, tmp_path):
    synthetic_photo(0, 1).save(tmp_path / "a.jpg")
    r = run_cli("predict", "--model", str(built_model), "--top-k", "0", str(tmp_path / "a.jpg"), check=False)
    assert r.returncode == 2 and "--top-k" in r.stderr


def test_option_prefixes_are_not_guessed(synthetic_data, tmp_path):
    r = run_cli("train-head", str(synthetic_data), "-o", str(tmp_path / "h.pt"), "--epoch", "5", check=False)
    assert r.returncode == 2 and "unrecognized arguments: --epoch" in r.stderr and not (tmp_path / "h.pt").exists()


def test_build_needs_an_output_and_says_what_it_replaced(built_model, synthetic_head, tmp_path):
    r = run_cli("build", check=False)
    assert r.returncode == 2 and "-o DIR" in r.stderr
    target = tmp_path / "m"
    import shutil

    shutil.copytree(built_model, target)
    old_sha = json.loads((target / "manifest.json").read_text())["model_sha256"][:12]
    r = run_cli("build", "-o", str(target), "--no-store")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("replaced"))
    assert "shapes (2)" in line and old_sha in line and "-> heads imagenet (1000)" in line


def test_help_version_defaults_and_choices():
    r = run_cli("--version")
    assert r.stdout.startswith("extendserve ")
    top = run_cli("--help").stdout
    assert "``" not in top and "train-head" in top
    help_text = run_cli("train-head", "--help").stdout
    for words in ("(default: 300)", "(default: 0.01)", "(default: 0)", "(default: 0.2)", ",".join(names())):
        assert words in " ".join(help_text.split()), words
    assert "(default: 5)" in " ".join(run_cli("predict", "--help").stdout.split())
    assert "new heads sit beside it" in run_cli("backbones").stdout
    flat = " ".join(help_text.split())
    assert "(default: efficientnet_lite0)" in flat  # --backbone shows its default
    assert flat.count("default 0") == 0 and "(0: all frozen) (default: 0)" in flat  # said once
    assert "(default: None)" not in flat and "(default: None)" not in run_cli("build", "--help").stdout


def test_cli_backbone_choices_come_from_the_registry_without_torch():
    code = ("import sys; from extendserve.cli.parser import parser; from extendserve.bases.registry import names; "
            "p = parser(); a = p.parse_args(['build', '--backbone', names()[-1]]); "
            "print(a.backbone, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == [names()[-1], "False"], r.stderr


def test_bentoml_build_without_the_model_says_so(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bentoml", "build"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=os.environ | {"EXTENDSERVE_MODEL": "extendserve-absent:latest"})
    assert r.returncode != 0 and "no model extendserve-absent:latest" in (r.stdout + r.stderr)


def test_make_serve_listens_on_this_machine_only():
    """`make serve` once listened on every interface; now 127.0.0.1 unless HOST says otherwise."""
    out = subprocess.run(["make", "-n", "serve"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "bentoml serve --host 127.0.0.1 " in out
    out = subprocess.run(["make", "-n", "serve", "HOST=0.0.0.0"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "bentoml serve --host 0.0.0.0 " in out


def test_make_serve_does_not_install_the_test_tools():
    serve = subprocess.run(["make", "-n", "-B", "serve"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    test = subprocess.run(["make", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-e '.[demo]'" in serve and ".[test]" not in serve
    assert ".[test]" in test and "pytest" in test


# --------------------------------------------------------------------------- frictions a new user met


def test_predict_outside_the_project_uses_the_demo_in_the_store(built_model, tmp_path):
    """`predict a.jpg` from any folder: models/default is not there, the store's demo is."""
    from extendserve.building.store import save_to_store

    from conftest import jpeg_bytes

    save_to_store(built_model, "default")
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(synthetic_photo(0, 5)))
    r = subprocess.run([sys.executable, "-m", "extendserve", "predict", "a.jpg", "--json"], cwd=tmp_path,
                       capture_output=True, text=True, env=os.environ)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["predictions"][0]["label"] == "red discs"
    piped = subprocess.run(f"'{sys.executable}' -m extendserve predict a.jpg a.jpg a.jpg | head -c 10", shell=True,
                           cwd=tmp_path, capture_output=True, text=True, env=os.environ)
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_backbones_prints_the_registry_at_once():
    import time

    t0 = time.time()
    r = run_cli("backbones")
    assert time.time() - t0 < 60 and all(n in r.stdout for n in names()) and "--imagenet" in r.stdout
    h = run_cli("backbones", "--help").stdout
    assert h.count("(default") == 0 and "JSON" in h


def test_api_run_returns_the_figures_and_keeps_argparse_quiet(built_model, synthetic_data, capsys):
    from extendserve.api import run
    from extendserve.errors import ExtendserveError

    res = run("eval", model=str(built_model), new=str(synthetic_data))
    assert isinstance(res, dict) and 0 <= res["new"]["accuracy"] <= 1
    photo = next((synthetic_data / "red discs").glob("*.jpg"))
    assert run("predict", str(photo), model=str(built_model))[0]["predictions"][0]["label"] == "red discs"
    capsys.readouterr()
    with pytest.raises(ExtendserveError, match="unrecognized arguments|not valid"):
        run("eval", model=str(built_model), no_such_option=3)
    assert "usage:" not in capsys.readouterr().err


def test_a_class_folder_given_for_the_data_folder_suggests_its_parent(synthetic_data, tmp_path):
    r = run_cli("train-head", str(synthetic_data / "red discs"), "-o", str(tmp_path / "h.pt"), check=False)
    assert r.returncode == 2 and "one class's folder" in r.stderr and str(synthetic_data.resolve()) in r.stderr


def test_build_from_a_folder_into_another_says_it_makes_a_new_store_model(built_model, tmp_path):
    r = run_cli("build", "--from", str(built_model), "-o", str(tmp_path / "m2"))
    assert "a new store model" in r.stdout and "extendserve-m2" in r.stdout
    assert "bentoml serve " + str(ROOT) in r.stdout  # the serve hint works from any folder


def test_file_names_are_printed_with_their_control_characters_escaped(tmp_path):
    """A photo named with ESC[2J cleared the screen (and the WARNING lines above), ESC[8m hid what
    followed, and a newline forged a `strangers: 0% (all clear)` line. Names are printed escaped."""
    root = tmp_path / "photos"
    for kind, name in enumerate(["discs", "stripes"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            synthetic_photo(kind, 40 * kind + i).save(root / name / f"{i}.jpg")
    evil = "x\x1b[2J\x1b[8m\nstrangers: 0% (all clear).jpg"
    (root / "discs" / evil).write_bytes(b"not a photo")
    (root / "discs" / evil.replace(".jpg", "-copy.jpg")).write_bytes((root / "stripes" / "0.jpg").read_bytes())
    r = run_cli("train-head", str(root), "-o", str(tmp_path / "h.pt"))
    out = r.stdout + r.stderr
    assert "\x1b" not in out and "\\x1b[2J" in out, out
    assert not any(line.startswith("strangers: 0% (all clear)") for line in out.splitlines()), out
    r = run_cli("predict", "--model", str(tmp_path / "nowhere"), str(root / "discs" / evil), check=False)
    assert "\x1b" not in r.stdout + r.stderr


def test_a_folder_nested_1500_deep_is_a_one_line_error(tmp_path):
    """It was a RecursionError traceback (Path.rglob recursed)."""
    root = tmp_path / "photos"
    synthetic_photo(0, 1).save((root / "discs").mkdir(parents=True) or root / "discs" / "0.jpg")
    deep = root / "stripes"
    deep.mkdir()
    for _ in range(1500):  # one level at a time: os.makedirs recurses too
        deep = deep / "d"
        deep.mkdir()
    synthetic_photo(1, 1).save(root / "stripes" / "0.jpg")
    try:
        r = run_cli("train-head", str(root), "-o", str(tmp_path / "h.pt"), check=False)
    finally:
        while deep != root / "stripes":  # deepest first: shutil.rmtree (and pytest's clean-up) recurse too
            deep.rmdir()
            deep = deep.parent
    assert r.returncode != 0 and "nested over" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_the_folder_above_the_classes_is_refused_with_the_folder_to_give(tmp_path):
    """parent/photos/<classes> and parent/held-out/<classes>: not two classes named 'photos' and 'held-out'."""
    for part in ("photos", "held-out"):
        for kind, name in enumerate(["discs", "stripes"]):
            (tmp_path / "parent" / part / name).mkdir(parents=True)
            synthetic_photo(kind, kind).save(tmp_path / "parent" / part / name / "0.jpg")
    r = run_cli("train-head", str(tmp_path / "parent"), "-o", str(tmp_path / "h.pt"), check=False)
    assert r.returncode == 2 and not (tmp_path / "h.pt").exists()
    assert "folders of photos, not photos" in r.stderr and str(tmp_path / "parent" / "photos") in r.stderr
    # one photo of its own makes a folder of kinds one class again (dogs/poodle, dogs/beagle)
    synthetic_photo(0, 5).save(tmp_path / "parent" / "photos" / "own.jpg")
    r = run_cli("train-head", str(tmp_path / "parent"), "-o", str(tmp_path / "h.pt"), "--holdout", "0")
    assert r.returncode == 0 and re.search(r"^ +3 .* photos$", r.stdout, re.M), r.stdout


def test_a_one_photo_class_is_named_and_the_others_are_still_measured(tmp_path):
    root = tmp_path / "photos"
    for kind, (name, count) in enumerate([("discs", 8), ("stripes", 8), ("lone", 1)]):
        (root / name).mkdir(parents=True)
        for i in range(count):
            synthetic_photo(kind % 2, 50 * kind + i).save(root / name / f"{i}.jpg")
    r = run_cli("train-head", str(root), "-o", str(tmp_path / "h.pt"))
    assert "held-out accuracy: not measured" not in r.stdout and "held-out accuracy:" in r.stdout
    assert "WARNING: class 'lone' has fewer than 5 photos" in r.stderr
    rows = {line.split()[-1]: line.split() for line in r.stdout.splitlines() if re.match(r"^ +\d+ ", line)}
    assert rows["lone"][1] == "-" and rows["discs"][1].endswith("%") and rows["stripes"][1].endswith("%"), r.stdout


def test_a_mistyped_option_gets_the_commands_usage_and_the_closest_option(tmp_path):
    r = run_cli("train-head", str(tmp_path), "-o", str(tmp_path / "h.pt"), "--max-takn", "0.1", check=False)
    assert r.returncode == 2 and "usage: extendserve train-head" in r.stderr and "did you mean --max-taken?" in r.stderr
    r = run_cli("train-head", str(tmp_path), "-o", str(tmp_path / "h.pt"), "--min_score", "0.5", check=False)
    assert r.returncode == 2 and "--min-score is an option of build, predict" in r.stderr
    r = run_cli("predict", "a.jpg", "--topk", "3", check=False)
    assert r.returncode == 2 and "usage: extendserve predict" in r.stderr and "did you mean --top-k?" in r.stderr
