"""The review samples a service kept (EXTENDSERVE_REVIEW_DIR, service/review.py): listed, and shown
as a page of thumbnails with the answers, so a person can file them into class folders for
train-head. The folder's files are untrusted: each answer file is read bounded, as JSON only, and
a photo is only ever the file beside it in that folder."""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import ExtendserveError
from ..files import write_atomic
from ..names import escaped
from .report import STYLE, _thumb

MAX_ANSWER_BYTES = 64 * 1024
MAX_SHOWN = 500


def read_samples(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Newest first: each kept photo's path, why it was kept, when, and its answers."""
    root = Path(folder)
    if not root.is_dir():
        raise ExtendserveError(f"{escaped(str(root))}: not a folder; give the service's EXTENDSERVE_REVIEW_DIR")
    out = []
    for meta in sorted(root.glob("*.json"), reverse=True):
        photos = [p for p in root.glob(f"{meta.stem}.*") if p.suffix != ".json" and p.is_file() and not p.is_symlink()]
        if not photos or meta.is_symlink() or meta.stat().st_size > MAX_ANSWER_BYTES:
            continue
        try:
            d = json.loads(meta.read_text())
            answers = [{"label": str(a["label"]), "score": float(a["score"]), "head": str(a["head"])}
                       for a in d["answers"][:10]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not an answer file of ours
        out.append({"path": str(photos[0]), "why": str(d.get("why", ""))[:200], "kept_at": str(d.get("kept_at", ""))[:40],
                    "answers": answers})
    return out


def render_review(samples: list[dict[str, Any]], folder: str) -> str:
    items = []
    for s in samples[:MAX_SHOWN]:
        src = _thumb(s["path"])
        img = f'<img src="{src}" alt="">' if src else '<div class="gone">unreadable</div>'
        said = "<br>".join(f"{html.escape(a['label'])} {a['score']:.0%}" for a in s["answers"][:3])
        items.append(f'<figure>{img}<figcaption>{said}<br><small>{html.escape(Path(s["path"]).name)}<br>'
                     f'{html.escape(s["why"])}, {html.escape(s["kept_at"])}</small></figcaption></figure>')
    more = f"<p>{len(samples) - MAX_SHOWN} older ones not shown.</p>" if len(samples) > MAX_SHOWN else ""
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>extendserve review</title>"
            f"<style>{STYLE}</style></head><body><h1>Review samples: {html.escape(folder)}</h1><p>{len(samples)} photos "
            "the service answered 'unknown' or under its review score, newest first, with their answers. Copy those of "
            "one kind into a folder of their own: a folder of such folders is what <code>extendserve train-head</code> "
            f"reads. Made {time.strftime('%Y-%m-%d %H:%M')}.</p><div class=\"gallery\">{''.join(items)}</div>{more}"
            "</body></html>")


def write_review(samples: list[dict[str, Any]], folder: str, path: str | os.PathLike[str]) -> Path:
    return write_atomic(Path(path), render_review(samples, folder).encode("utf-8"))
