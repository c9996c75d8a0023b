"""``extendserve eval --report``: a self-contained page with accuracy per class, a confusion matrix
and the photos behind the mistakes, rendered in a real Chromium (skipped without one)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli, synthetic_photo
from test_service import CHROMIUM, _browser


@pytest.fixture(scope="module")
def evaluated(built_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for kind, name in enumerate(["red discs", "blue stripes"]):
        (root / "new" / name).mkdir(parents=True)
        for i in range(4):
            synthetic_photo(kind, 5000 + 10 * kind + i).save(root / "new" / name / f"{i}.jpg")
    synthetic_photo(0, 7777).save(root / "new" / "blue stripes" / "really-a-disc.jpg")  # a sure miss
    (root / "imagenet").mkdir()
    for i, synset in enumerate(["n01440764", "n01443537", "n01484850"]):
        synthetic_photo(i % 2, 9000 + i).save(root / "imagenet" / f"{synset}_{i}.JPEG")
    r = run_cli("eval", "--model", str(built_model), "--new", str(root / "new"), "--imagenet", str(root / "imagenet"),
                "--report", str(root / "report.html"), "--json")
    return root, json.loads(r.stdout)


def test_report_is_one_self_contained_page(evaluated):
    root, res = evaluated
    page = (root / "report.html").read_text()
    assert "<script" not in page and not re.search(r'(src|href)="https?:', page)  # nothing fetched from anywhere
    assert page.count('class="class-row"') == 2 and "<svg" in page
    missed = res["new"]["photos"] - sum(c["correct"] for c in res["new"]["per_class"].values())
    assert missed >= 1 and page.count('<figure class="missed">') == missed
    taken = round(res["imagenet"]["stolen"] * res["imagenet"]["photos"])
    assert page.count('<figure class="taken">') == taken
    assert "really-a-disc.jpg" in page and "photos" not in res  # the per-photo list is for the page only


def test_report_renders_in_chromium(evaluated, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    root, res = evaluated
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((root / "report.html").as_uri())
        assert page.locator("tr.class-row").count() == 2
        rows = 2 + 1  # two new classes and the ImageNet photos
        assert page.locator("rect.cell").count() == rows * (2 + 1)  # their columns and "an ImageNet class"
        figures = page.locator("figure").count()
        assert figures >= 1 and page.evaluate("Array.from(document.images).filter(i => i.naturalWidth > 0).length") == figures
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()


def test_report_into_a_folder_is_refused(built_model, evaluated):
    root, _ = evaluated
    r = run_cli("eval", "--model", str(built_model), "--new", str(root / "new"), "--report", str(root), check=False)
    assert r.returncode == 2 and "is a folder" in r.stderr
