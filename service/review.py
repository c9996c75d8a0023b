"""Opt-in review samples: a bounded, sampled set of the photos the service answered 'unknown' or
under a score, with their answers, for a person to look at (``extendserve review FOLDER``) and to
file into class folders for train-head. Off unless EXTENDSERVE_REVIEW_DIR is set: these are users'
photos (docs/security.md says what is kept, where and for how long). No torch here.

Each kept photo is its bytes as sent under a name of our own (time and content digest, never the
client's file name) and a JSON file beside it with the answers; the oldest are dropped past
EXTENDSERVE_REVIEW_MAX_PHOTOS or EXTENDSERVE_REVIEW_MAX_MB. Written off the event loop, atomically.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extendserve.errors import ExtendserveError
from extendserve.files import write_atomic
from extendserve.serving.settings import env_number

log = logging.getLogger("extendserve")
KINDS = {b"\xff\xd8\xff": ".jpg", b"\x89PNG": ".png", b"GIF8": ".gif", b"RIFF": ".webp", b"BM": ".bmp",
         b"II*\x00": ".tif", b"MM\x00*": ".tif"}


def extension(data: bytes) -> str:
    """The photo's own kind by its first bytes, so that the kept file reads as a photo again."""
    return next((ext for magic, ext in KINDS.items() if data.startswith(magic)), ".img")


@dataclass
class Review:
    folder: Path
    below: float  # a photo whose best score is under this is a candidate (and every 'unknown')
    share: float  # of the candidates, the share kept
    max_photos: int
    max_bytes: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Review | None:
        """The settings, or None when off; a folder that cannot be written stops the start."""
        where = env.get("EXTENDSERVE_REVIEW_DIR")
        if not where:
            return None
        folder = Path(where)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ExtendserveError(f"EXTENDSERVE_REVIEW_DIR={where}: cannot write there ({e.strerror or e}); give a "
                                   "writable folder (in the image: a mounted volume, not the read-only root)") from None
        return cls(folder, env_number(env, "EXTENDSERVE_REVIEW_BELOW", 0.5, float, 0, 1),
                   env_number(env, "EXTENDSERVE_REVIEW_SHARE", 0.1, float, 0, 1),
                   env_number(env, "EXTENDSERVE_REVIEW_MAX_PHOTOS", 500, int, 1, 1_000_000),
                   int(env_number(env, "EXTENDSERVE_REVIEW_MAX_MB", 256, float, 1, 1e6) * 2**20))

    def picked(self, answers: list[list[Any]]) -> list[int]:
        """Which photos to keep: 'unknown' or under ``below``, then a random ``share`` of those."""
        return [i for i, a in enumerate(answers)
                if (a[0].index == -1 or a[0].score < self.below) and random.random() < self.share]

    async def keep(self, photos: list[Any], answers: list[list[Any]]) -> None:
        picked = self.picked(answers)
        if picked:
            data = [await asyncio.to_thread(p.read_bytes) if isinstance(p, Path) else bytes(p) for p in
                    (photos[i] for i in picked)]
            try:
                await asyncio.to_thread(self._write, data, [answers[i] for i in picked])
            except OSError as e:  # a full disk loses a sample, never an answer
                log.warning("extendserve: review sample not kept (%s)", e.strerror or e)

    def _write(self, photos: list[bytes], answers: list[list[Any]]) -> None:
        for data, answer in zip(photos, answers):
            stem = f"{time.time_ns()}-{hashlib.sha256(data).hexdigest()[:12]}"
            write_atomic(self.folder / f"{stem}{extension(data)}", data)
            write_atomic(self.folder / f"{stem}.json", json.dumps({
                "answers": [p.to_dict() for p in answer], "kept_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "why": "unknown" if answer[0].index == -1 else f"best score under {self.below}"}).encode())
        self._trim()

    def _trim(self) -> None:
        """Oldest first, until within the count and bytes (several workers share the folder)."""
        kept = sorted(p for p in self.folder.iterdir() if p.suffix != ".json" and not p.name.startswith("."))
        sizes = {p: p.stat().st_size for p in kept if p.exists()}
        total = sum(sizes.values())
        for p in kept:
            if len(sizes) <= self.max_photos and total <= self.max_bytes:
                break
            total -= sizes.pop(p, 0)
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
