"""The service's own series on a real `bentoml serve`, and deploy/prometheus/rules.yml in a real
Prometheus (Debian's `prometheus`; skipped with the reason where it is not installed) scraping it:
photos that should fire each alert fire it, photos that should not, do not."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, jpeg_bytes, run_cli, synthetic_photo, wait_for
from test_service import Server, free_port

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "extendserve.json"


@pytest.fixture(scope="module")
def served(synthetic_data, tmp_path_factory):
    """A head with its held-out figures, built with min_score 0.5, served by one worker."""
    tmp = tmp_path_factory.mktemp("promised")
    run_cli("train-head", str(synthetic_data), "-o", str(tmp / "shapes.pt"))
    run_cli("build", "--new-head", str(tmp / "shapes.pt"), "-o", str(tmp / "m"), "--no-store", "--min-score", "0.5")
    s = Server(tmp / "m", EXTENDSERVE_WORKERS="1")
    yield s, json.loads((tmp / "m" / "manifest.json").read_text())
    s.stop()


def series(server: Server) -> dict[str, float]:
    """/metrics as {name{labels}: value}, extendserve's own series only."""
    text = urllib.request.urlopen(server.url + "/metrics", timeout=60).read().decode()
    return {k: float(v) for k, v in re.findall(r"^(extendserve_\S+) (\S+)$", text, re.M)}


def noise(seed: int) -> bytes:
    return jpeg_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (240, 320, 3), np.uint8)))


def blend(seed: int) -> bytes:
    """Half a disc photo, half a stripe photo: named as one of the two, at about an even score."""
    a, b = np.asarray(synthetic_photo(0, seed)), np.asarray(synthetic_photo(1, seed))
    return jpeg_bytes(Image.fromarray(np.concatenate([a[:, :160], b[:, 160:]], 1)))


def send(server: Server, photos: list[bytes], **fields: str) -> None:
    for p in photos:
        status, body = server.post("/classify", [("image", p, "p.jpg"), *((k, v, None) for k, v in fields.items())])
        assert status == 200, body


def test_answers_scores_promises_and_stages_are_series(served):
    server, manifest = served
    head = manifest["heads"][1]
    s = series(server)
    promised = {k: v for k, v in s.items() if k.startswith("extendserve_head_promise")}
    assert promised['extendserve_head_promise{figure="heldout_accuracy",head="shapes",model="m"}'] == pytest.approx(
        head["heldout"]["accuracy"])
    assert promised['extendserve_head_promise{figure="min_score",head="all",model="m"}'] == 0.5
    named = 'extendserve_answers_total{endpoint="classify",head="shapes",model="m"}'
    unknown = 'extendserve_answers_total{endpoint="classify",head="unknown",model="m"}'
    before = s.get(named, 0.0), s.get(unknown, 0.0)
    send(server, [jpeg_bytes(synthetic_photo(0, 500 + i)) for i in range(3)])
    send(server, [noise(i) for i in range(3)])
    s = series(server)
    assert s[named] - before[0] == 3 and s[unknown] - before[1] == 3, {k: v for k, v in s.items() if "answers" in k}
    assert s['extendserve_top_score_count{head="shapes",model="m"}'] >= 3
    for stage in ("decode", "queue", "model", "answer"):
        assert s[f'extendserve_stage_seconds_count{{stage="{stage}"}}'] > 0, stage
    assert s["extendserve_workers_ready"] == 1 and s["extendserve_workers"] == 1
    assert s["extendserve_memory_budget_bytes"] > 0 and "extendserve_memory_refused_total" in s
    for _ in range(200):  # random paths make no series of ours
        try:
            urllib.request.urlopen(server.url + f"/nothing/{np.random.default_rng().integers(1 << 30)}", timeout=10)
        except urllib.error.HTTPError:
            pass
    assert len(series(server)) == len(s)


def test_promtool_checks_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; make prometheus)")
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


class Prometheus:
    def __init__(self, target: str, tmp: Path):
        rules = tmp / "rules.yml"  # the rules as shipped, judged at once rather than after minutes
        rules.write_text(re.sub(r"for: \d+m", "for: 0s", RULES.read_text()))
        (tmp / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{rules}]\n"
            f"scrape_configs: [{{job_name: extendserve, static_configs: [{{targets: ['{target}']}}]}}]\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "prometheus.log", "w+")
        self.proc = subprocess.Popen([shutil.which("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        return json.loads(urllib.request.urlopen(url, timeout=30).read())

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.api("alerts")["data"]["alerts"] if a["state"] == "firing"}

    def value(self, query: str) -> float | None:
        try:
            r = self.api("query", query=query)["data"]["result"]
        except (urllib.error.URLError, ConnectionError):  # not listening yet
            assert self.proc.poll() is None, "prometheus exited: " + Path(self.log.name).read_text()[-2000:]
            return None
        return float(r[0]["value"][1]) if r else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def test_alerts_fire_on_a_real_prometheus(served, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus; make prometheus)")
    server, _ = served
    prom = Prometheus(f"127.0.0.1:{server.port}", tmp_path)
    try:
        wait_for("Prometheus scraping the service", lambda: prom.value('up{job="extendserve"}') == 1 or None, 120, 0.5)
        send(server, [jpeg_bytes(synthetic_photo(i % 2, 700 + i)) for i in range(24)])  # what the head knows
        wait_for("the estimate over 24 clear photos", lambda: (prom.value(
            'extendserve:head_estimated_accuracy:10m{head="shapes"}') or 0) > 0.85 or None, 120, 0.5)
        assert not prom.firing() & {"ExtendserveEstimatedAccuracyLow", "ExtendserveUnknownShareHigh",
                                    "ExtendserveInputDrift", "ExtendserveWorkersNotWarm"}, prom.firing()
        send(server, [blend(800 + i) for i in range(30)], min_score="0")  # named, but unsure: the estimate falls
        wait_for("ExtendserveEstimatedAccuracyLow", lambda: "ExtendserveEstimatedAccuracyLow" in prom.firing() or None,
                 120, 0.5)
        send(server, [noise(900 + i) for i in range(60)])  # nothing it knows: 'unknown', unfamiliar
        wait_for("ExtendserveUnknownShareHigh and ExtendserveInputDrift", lambda: {
            "ExtendserveUnknownShareHigh", "ExtendserveInputDrift"} <= prom.firing() or None, 120, 0.5)
        assert "ExtendserveWorkersNotWarm" not in prom.firing() and "ExtendserveMemoryRefusals" not in prom.firing()
        for panel in json.loads(DASHBOARD.read_text())["panels"]:  # every panel's query is one Prometheus takes
            for target in panel.get("targets", []):
                assert prom.api("query", query=target["expr"])["status"] == "success", target["expr"]
    finally:
        prom.stop()
