"""The service's series as a real Prometheus records them, plotted: docs/series.svg for docs/deploy.md.

A head trained on four of the shared celebrities (the fifth left out as strangers), built with
min_score 0.5, served by `bentoml serve` (2 workers) and scraped every second by Debian's
`prometheus` with deploy/prometheus/rules.yml. Fed in turn, 40 s each, one photo at a time:
held-out photos of the four, the fifth person's photos, ImageNet sample photos, noise. Plotted from
Prometheus' query_range API over 30 s windows: the head's estimated accuracy, the share it named,
the 'unknown' share and the unfamiliar (drift) share.
Usage: python bench/serving/series_plot.py   (needs ../shared and prometheus)
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "serving"), str(ROOT / "bench")]
from test_prometheus import Prometheus  # noqa: E402  (the test's own Prometheus runner)

from common import SAMPLE, SHARED  # noqa: E402
from test_service import Server  # noqa: E402

PHASE_S = 40
WINDOW = "30s"
ALL = " / sum(rate(extendserve_answers_total[W]))"
QUERIES = {
    "estimated accuracy (named photos' mean top score)": 'sum(rate(extendserve_top_score_sum{head="people"}[W])) / '
                                                          'sum(rate(extendserve_top_score_count{head="people"}[W]))',
    "share named as the head": 'sum(rate(extendserve_answers_total{head="people"}[W]))' + ALL,
    "share answered 'unknown'": 'sum(rate(extendserve_answers_total{head="unknown"}[W]))' + ALL,
    "share unfamiliar (drift)": "sum(rate(extendserve_unfamiliar_photos_total[W]))" + ALL,
}
COLOURS = ("#36c", "#c63", "#393", "#939")


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "extendserve", *args], check=True, capture_output=True)


def noise(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (240, 320, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def svg(series: dict[str, list[tuple[float, float]]], t0: float, phases: list[tuple[str, float]]) -> str:
    w, h, m = 760, 300, 50
    span = max(t for pts in series.values() for t, _ in pts) - t0

    def xy(t: float, v: float) -> tuple[float, float]:
        return m + (t - t0) / span * (w - m - 200), h - m - v * (h - m - 20)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect x="{m}" y="20" width="{w - m - 200}" height="{h - m - 20}" fill="none" stroke="#ccc"/>']
    for v in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<text x="{m - 6}" y="{xy(t0, v)[1] + 4:.0f}" text-anchor="end">{v:g}</text>')
    for name, start in phases:
        x = xy(start, 0)[0]
        out.append(f'<line x1="{x:.0f}" y1="20" x2="{x:.0f}" y2="{h - m}" stroke="#bbb" stroke-dasharray="3"/>'
                   f'<text x="{x + 3:.0f}" y="{h - m + 14}">{name}</text>')
    for i, (name, pts) in enumerate(series.items()):
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b in (xy(t, v) for t, v in pts))
        out.append(f'<polyline points="{line}" fill="none" stroke="{COLOURS[i]}" stroke-width="2"/>'
                   f'<text x="{w - 195}" y="{40 + 18 * i}" fill="{COLOURS[i]}">{name}</text>')
    out.append(f'<text x="{m + (w - m - 200) / 2:.0f}" y="{h - 8}" text-anchor="middle">seconds, {WINDOW} windows</text></svg>')
    return "\n".join(out)


def main() -> None:
    if shutil.which("prometheus") is None or not SHARED.is_dir():
        raise SystemExit("needs Debian's prometheus (make prometheus) and ../shared")
    tmp = Path(tempfile.mkdtemp(prefix="series-"))
    people = sorted(d for d in (SHARED / "celebs" / "train").iterdir() if d.is_dir())
    held: list[Path] = []
    for d in people[:4]:
        (tmp / "people" / d.name).mkdir(parents=True)
        photos = sorted(d.iterdir())
        for p in photos[4:]:
            (tmp / "people" / d.name / p.name).symlink_to(p)
        held += photos[:4]
    cli("train-head", str(tmp / "people"), "-o", str(tmp / "people.pt"))
    cli("build", "--new-head", str(tmp / "people.pt"), "-o", str(tmp / "m"), "--no-store", "--min-score", "0.5")
    feeds = [("held-out faces", [p.read_bytes() for p in held]),
             ("strangers", [p.read_bytes() for p in sorted(people[4].iterdir())]),
             ("ImageNet", [p.read_bytes() for p in sorted(SAMPLE.glob("*.JPEG"))[:60]]),
             ("noise", [noise(i) for i in range(30)])]
    server = Server(tmp / "m", log_dir=tmp, EXTENDSERVE_WORKERS="2")
    prom = Prometheus(f"127.0.0.1:{server.port}", tmp)
    try:
        while prom.value('up{job="extendserve"}') != 1:
            time.sleep(0.5)
        t0 = time.time()
        phases = []
        for name, photos in feeds:
            phases.append((name, time.time()))
            end, i = time.time() + PHASE_S, 0
            while time.time() < end:
                server.post("/classify", [("image", photos[i % len(photos)], "p.jpg")])
                i += 1
        time.sleep(3)
        series = {}
        for name, q in QUERIES.items():
            r = prom.api("query_range", query=q.replace("[W]", f"[{WINDOW}]"), start=str(t0), end=str(time.time()),
                         step="2")["data"]["result"]
            series[name] = [(float(t), float(v)) for t, v in r[0]["values"] if v not in ("NaN", "+Inf")] if r else []
        (ROOT / "docs" / "series.svg").write_text(svg(series, t0, phases))
        print(json.dumps({k: [round(v, 3) for _, v in pts[::10]] for k, pts in series.items()}, indent=1))
    finally:
        prom.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
