"""``extendserve eval --report report.html``: what an evaluation found, as one self-contained page
(no scripts, no links out; thumbnails inline), the way Teachable Machine and Model Maker show
per-class results: accuracy per class, a confusion matrix, and the photos behind the mistakes.
No torch here: Pillow for the thumbnails.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomic

MAX_ROWS = 30  # classes in the matrix: the worst ones (a 1000-class matrix is no picture)
MAX_THUMBS = 48  # photos per mistake gallery, most confident mistakes first
THUMB = 160
BASE = "an ImageNet class"  # one column for all the base's own classes


def _thumb(path: str) -> str | None:
    """A small JPEG of the photo as a data URI (None if it cannot be read any more)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB * 2, THUMB * 2))  # JPEG: decoded small, fast
            small = ImageOps.exif_transpose(im).convert("RGB")
            small.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _column(label: str, new: set[str]) -> str:
    return label if label in new else BASE


def confusion(photos: list[dict[str, Any]], new_classes: list[str]) -> tuple[list[str], list[str], dict[tuple[str, str], int]]:
    """Rows (true: the worst new classes, then ImageNet photos), columns (answers: those classes,
    any other new class, any ImageNet class) and the counts."""
    new = set(new_classes)
    counts: Counter[tuple[str, str]] = Counter()
    per: dict[str, list[int]] = {}
    for p in photos:
        true = p["true"] if p["set"] == "new" else "ImageNet photos"
        counts[(true, _column(p["predicted"], new))] += 1
        if p["set"] == "new":
            per.setdefault(true, [0, 0])[0] += p["predicted"] == true
            per[true][1] += 1
    worst = sorted(per, key=lambda c: (per[c][0] / per[c][1], c))[:MAX_ROWS]
    rows = sorted(worst) + (["ImageNet photos"] if any(p["set"] == "imagenet" for p in photos) else [])
    shown = set(worst)
    cols = sorted(worst)
    folded: Counter[tuple[str, str]] = Counter()
    for (t, a), c in counts.items():
        if t in rows:
            folded[(t, a if a in shown or a == BASE else "another new class")] += c
    if any(a == "another new class" for _, a in folded):
        cols.append("another new class")
    return rows, cols + [BASE], dict(folded)


def _matrix_svg(rows: list[str], cols: list[str], counts: dict[tuple[str, str], int]) -> str:
    cell, left, top = 34, 190, 150
    w, h = left + cell * len(cols) + 120, top + cell * len(rows) + 10  # room for the last slanted name
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
           f'aria-label="confusion matrix" font-family="sans-serif" font-size="11">']
    for j, c in enumerate(cols):
        x = left + j * cell + cell / 2
        out.append(f'<text transform="translate({x + 4},{top - 6}) rotate(-55)">{html.escape(c[:28])}</text>')
    for i, r in enumerate(rows):
        y = top + i * cell
        total = sum(counts.get((r, c), 0) for c in cols) or 1
        out.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end">{html.escape(r[:30])}</text>')
        for j, c in enumerate(cols):
            n = counts.get((r, c), 0)
            right = r == c or (r == "ImageNet photos" and c == BASE)
            share = n / total
            colour = f"rgba(22,128,60,{0.12 + 0.88 * share:.2f})" if right else f"rgba(200,40,40,{0.1 + 0.9 * share:.2f})"
            out.append(f'<rect class="cell" x="{left + j * cell}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                       f'fill="{colour if n else "#f4f4f4"}"><title>{html.escape(r)} -> {html.escape(c)}: {n}</title></rect>')
            if n:
                out.append(f'<text x="{left + j * cell + cell / 2 - 1}" y="{y + cell / 2 + 3}" text-anchor="middle">{n}</text>')
    out.append("</svg>")
    return "".join(out)


def _gallery(title: str, photos: list[dict[str, Any]], empty: str, css: str) -> str:
    photos = sorted(photos, key=lambda p: -p["score"])
    items = []
    for p in photos[:MAX_THUMBS]:
        src = _thumb(p["path"])
        img = f'<img src="{src}" alt="">' if src else '<div class="gone">unreadable</div>'
        items.append(f'<figure class="{css}">{img}<figcaption><b>{html.escape(p["true"])}</b> named '
                     f'<b>{html.escape(p["predicted"])}</b> ({p["score"]:.0%})<br><small>'
                     f'{html.escape(Path(p["path"]).name)}</small></figcaption></figure>')
    more = f"<p>{len(photos) - MAX_THUMBS} more not shown (the most confident mistakes are first).</p>" \
        if len(photos) > MAX_THUMBS else ""
    body = "".join(items) if items else f"<p>{empty}</p>"
    return f'<section><h2>{title} ({len(photos)})</h2><div class="gallery">{body}</div>{more}</section>'


STYLE = """.plot .frame{fill:none;stroke:#ccc}.plot .curve{fill:none;stroke:#36c;stroke-width:2}.plot circle{fill:#36c}
.plot .ref{stroke:#aaa;stroke-dasharray:4}.plot text{font-size:11px}
.plot .tick{font-size:10px;fill:#555}.warning{background:#fff3cd;padding:.2rem 1rem}
body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1200px;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}.cards{display:flex;flex-wrap:wrap;gap:1rem}
.card{border:1px solid #ddd;border-radius:8px;padding:.7rem 1rem;min-width:12rem}.card b{font-size:1.5rem;display:block}
table{border-collapse:collapse}td,th{padding:.2rem .6rem;text-align:left}td.num{text-align:right}
.bar{background:#1a7f3c;height:.7rem;border-radius:3px}.barbox{width:12rem;background:#eee;border-radius:3px}
.gallery{display:flex;flex-wrap:wrap;gap:.6rem}figure{margin:0;width:170px;font-size:.75rem}
figure img{width:160px;height:160px;object-fit:cover;border-radius:4px;border:3px solid #c33}
figure.taken img{border-color:#d98a00}.matrix{overflow-x:auto}small{color:#666}"""


def _plot_svg(points: list[tuple[float, float]], xlabel: str, ylabel: str, diagonal: bool = False,
              sizes: list[int] | None = None, xtick: Any = "{:g}".format) -> str:
    """A small line plot of 0-1 values: the trade curve, the reliability diagram; numbers on both
    axes at 0, 0.25 ... 1 (``xtick``: how an x value is written)."""
    w, h, m = 320, 230, 46

    def xy(x: float, y: float) -> tuple[float, float]:
        return m + x * (w - m - 10), h - m - y * (h - m - 10)

    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in (xy(x, y) for x, y in points))
    dots = "".join(f'<circle cx="{xy(x, y)[0]:.1f}" cy="{xy(x, y)[1]:.1f}" r="3"><title>{x:.3f}, {y:.3f}'
                   f'{f" ({sizes[i]} photos)" if sizes else ""}</title></circle>' for i, (x, y) in enumerate(points))
    ref = f'<line x1="{xy(0, 0)[0]}" y1="{xy(0, 0)[1]}" x2="{xy(1, 1)[0]}" y2="{xy(1, 1)[1]}" class="ref"/>' if diagonal else ""
    ticks = "".join(f'<text x="{xy(v, 0)[0]:.1f}" y="{h - m + 14}" text-anchor="middle" class="tick">'
                    f'{html.escape(xtick(v))}</text>'
                    f'<text x="{m - 4}" y="{xy(0, v)[1] + 4:.1f}" text-anchor="end" class="tick">{v:g}</text>'
                    for v in (0, 0.25, 0.5, 0.75, 1))
    return (f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" class="plot">'
            f'<rect x="{m}" y="10" width="{w - m - 10}" height="{h - m - 10}" class="frame"/>{ref}{ticks}'
            f'<polyline points="{line}" class="curve"/>{dots}'
            f'<text x="{(w + m) / 2}" y="{h - 6}" text-anchor="middle">{html.escape(xlabel)}</text>'
            f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{html.escape(ylabel)}</text>'
            "</svg>")


def _checks_sections(res: dict[str, Any], photos: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The head's own checks (strangers, the trade), its training photos, and the reliability diagram."""
    cards, sections = [], []
    for head, n in (res.get("training_photos") or {}).items():
        sections.append(f'<section class="warning"><h2>Optimistic figures</h2><p>{n} of the photos given were training '
                        f'photos of head <b>{html.escape(head)}</b>: a head knows its own photos, so figures on them '
                        "are optimistic. Evaluate on photos held out before training.</p></section>")
    for head, c in (res.get("heads_checks") or {}).items():
        if c.get("strangers_named") is not None:
            cards.append(f'<div class="card">strangers named as one of head {html.escape(head)}\'s classes'
                         f'<b>{c["strangers_named"]:.0%}</b>measured at train-head, each class left out in turn</div>')
        if c.get("trade"):
            pts = [(min(1.0, t["max_taken"] * 10), t["accuracy"]) for t in c["trade"]]
            plot = _plot_svg(pts, "background photos taken", "held-out accuracy", xtick=lambda v: f"{v * 10:g}%")
            sections.append(f"<section><h2>The trade, head {html.escape(head)}</h2><p>Held-out new-class accuracy "
                            "against the share of the base's background photos taken (train-head --max-taken chooses "
                            f"the point).</p>{plot}</section>")
    new = [p for p in photos if p["set"] == "new"]
    if new:
        edges = np.linspace(0, 1, 11)
        pts, sizes = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            b = [p for p in new if lo <= p["score"] < hi or (hi == 1 and p["score"] == 1)]
            if b:
                pts.append((float(np.mean([p["score"] for p in b])), float(np.mean([p["predicted"] == p["true"] for p in b]))))
                sizes.append(len(b))
        sections.append("<section><h2>Reliability</h2><p>The score given against how often it was right, new-class "
                        "photos in ten bins (on the diagonal: a score of 0.9 is right nine times in ten).</p>"
                        f"{_plot_svg(pts, 'score', 'right', diagonal=True, sizes=sizes)}</section>")
    return cards, sections


def render_html(res: dict[str, Any]) -> str:
    """The page for an :func:`evaluate.evaluate` result made with ``photos=True``."""
    photos = res.get("photos", [])
    cards, sections = [], []
    if "new" in res:
        n = res["new"]
        cards.append(f'<div class="card">new classes, top-1 among all {res["classes"]}<b>{n["accuracy"]:.1%}</b>'
                     f'{n["photos"]} photos</div>')
        rows = "".join(
            f'<tr class="class-row"><td>{html.escape(c)}</td><td class="num">{r["correct"]}/{r["photos"]}</td>'
            f'<td class="num">{r["accuracy"]:.0%}</td><td><div class="barbox"><div class="bar" '
            f'style="width:{100 * r["accuracy"]:.0f}%"></div></div></td></tr>'
            for c, r in sorted(n["per_class"].items(), key=lambda kv: (kv[1]["accuracy"], kv[0])))
        sections.append(f'<section><h2>Accuracy per new class (worst first)</h2><table><tr><th>class</th>'
                        f'<th>right</th><th>top-1</th><th></th></tr>{rows}</table></section>')
    if "imagenet" in res:
        m = res["imagenet"]
        cards.append(f'<div class="card">ImageNet top-1, before -> after<b>{m["top1_before"]:.1%} -> '
                     f'{m["top1_after"]:.1%}</b>{m["photos"]} photos</div>')
        cards.append(f'<div class="card">ImageNet photos a new class took<b>{m["stolen"]:.1%}</b>should be near 0</div>')
    new_classes = list(res.get("new", {}).get("per_class", {}))
    if photos and new_classes:
        r, c, counts = confusion(photos, new_classes)
        note = (f" The {MAX_ROWS} worst of {len(new_classes)} classes are shown." if len(new_classes) > MAX_ROWS else "")
        sections.append(f'<section><h2>Confusion matrix</h2><p>Rows: what the photo is; columns: what the model '
                        f'answered (green: right; red: wrong; shade: share of the row).{note}</p>'
                        f'<div class="matrix">{_matrix_svg(r, c, counts)}</div></section>')
    if "new" in res:
        missed = [p for p in photos if p["set"] == "new" and p["predicted"] != p["true"]]
        sections.append(_gallery("New-class photos it missed", missed, "None: every new-class photo was named right.",
                                 "missed"))
    if "imagenet" in res:
        taken = [p for p in photos if p["set"] == "imagenet" and p["taken"]]
        sections.append(_gallery("ImageNet photos a new class took", taken, "None: no ImageNet photo was named as a "
                                 "new class.", "taken"))
    more_cards, more_sections = _checks_sections(res, photos)
    cards += more_cards
    sections = more_sections[:1] + sections + more_sections[1:] if res.get("training_photos") else sections + more_sections
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>extendserve eval: {html.escape(str(res["model"]))}'
            f'</title><style>{STYLE}</style></head><body><h1>extendserve eval: {html.escape(str(res["model"]))}</h1>'
            f'<p>{res["classes"]} classes; {when}</p><div class="cards">{"".join(cards)}</div>{"".join(sections)}'
            "</body></html>")


def write_report(res: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the page at ``path`` all at once (a failed write leaves no half page)."""
    return write_atomic(Path(path), render_html(res).encode("utf-8"))
