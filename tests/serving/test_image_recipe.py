"""How the image is made, checked without building it: what reaches a shell, and who owns what."""

from __future__ import annotations

import os
import subprocess

from conftest import ROOT


def test_a_model_name_never_reaches_a_shell(tmp_path):
    """`make image MODEL='x; cmd #'` once ran cmd: MODEL was spliced into the recipe unquoted. It
    reaches tools/image.sh through the environment now, and the script refuses what is not a tag."""
    evil = f"x; touch {tmp_path}/pwned #"
    dry = subprocess.run(["make", "-n", "image", f"MODEL={evil}"], cwd=ROOT, capture_output=True, text=True)
    assert "touch" not in "\n".join(ln for ln in dry.stdout.splitlines() if "image.sh" in ln), dry.stdout
    r = subprocess.run([str(ROOT / "tools" / "image.sh"), "cpu"], cwd=ROOT, capture_output=True, text=True,
                       env=os.environ | {"MODEL": evil, "ENGINE": "none"})
    assert r.returncode == 2 and "is not a model store tag" in r.stderr, r.stderr
    assert not (tmp_path / "pwned").exists()


def test_the_files_the_service_runs_from_belong_to_root():
    """The image hands the bento and the Python environment to root before it switches to the serving
    user, so a writable root filesystem is no worse than a read-only one (tests/serving/image_check.py
    checks the built image)."""
    recipe = (ROOT / "deploy" / "Dockerfile.template").read_text()
    assert "{% extends bento_base_template %}" in recipe and "chown -R root:root" in recipe and "go-w" in recipe
    assert "dockerfile_template: deploy/Dockerfile.template" in (ROOT / "tools" / "image.sh").read_text()
