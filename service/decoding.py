"""Photos decoded for the model within the worker's memory budget. No torch here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from extendserve.errors import BadImageError
from extendserve.photos.preprocess import decode_cost
from extendserve.serving.budget import MemoryBudget, OverBudget

from .edge import ClientError


class Decoding:
    """An uploaded file, a raw body or a form's part -> the model's pixels: size-checked before it
    is read, at most ``at_once`` photos at a time on this worker whatever the number of requests (a
    decoded 12 MP photo is 36 MB; six concurrent batches once took a worker from 333 MB to 1 GB for
    good), and what decoding will hold (read from the photo's header) taken from the budget first."""

    def __init__(self, model: Any, budget: MemoryBudget, max_upload: int, at_once: int,
                 decoded: Callable[[float], None] = lambda seconds: None):
        self.model, self.budget, self.max_upload, self.decoded = model, budget, max_upload, decoded
        self.slots = asyncio.Semaphore(at_once)

    async def __call__(self, photo: Path | bytes | memoryview, name: str) -> np.ndarray:
        size = photo.stat().st_size if isinstance(photo, Path) else len(photo)
        if size > self.max_upload:
            raise ClientError(413, f"{name}: {size / 2**20:.1f} MB is over the {self.max_upload / 2**20:.0f} MB upload "
                                   "limit (EXTENDSERVE_MAX_UPLOAD_MB)")
        async with self.slots:
            data = await asyncio.to_thread(photo.read_bytes) if isinstance(photo, Path) else photo
            cost = decode_cost(data, self.model.preprocess.resize) + (size if isinstance(photo, Path) else 0)
            if cost > self.budget.limit:
                raise ClientError(413, f"{name}: decoding it would hold {cost / 2**20:.0f} MB, over this worker's whole "
                                       f"memory budget of {self.budget.limit / 2**20:.0f} MB; resize the photo or save it "
                                       "as JPEG")
            try:
                self.budget.take(cost, f"decoding {name}")
            except OverBudget as e:
                raise ClientError(503, e.message) from None
            try:
                t0 = time.perf_counter()
                pixels = await asyncio.to_thread(self.model.prepare, data, name)
                self.decoded(time.perf_counter() - t0)
                return pixels
            except BadImageError as e:
                raise ClientError(400, str(e)) from None
            finally:
                self.budget.give(cost)
