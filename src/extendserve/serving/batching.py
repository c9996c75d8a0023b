"""Adaptive batching in-process: concurrent single-photo requests share one model call.

The first waiting photo opens a window of at most ``max_wait_ms``; whatever arrives in it (up to
``max_batch``) runs as one batch in a worker thread (onnxruntime releases the GIL). Under no
load a photo waits at most the window; under load batches fill and the window never expires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np


class MicroBatcher:
    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_ms: float = 4.0):
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray], float]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.model_calls = 0  # what batching did so far, shown in /info
        self.photos = 0
        # told of every model call: its photos' seconds in the queue, the call's seconds (the service's series)
        self.on_batch: Callable[[list[float], float], None] | None = None

    def stats(self) -> dict[str, float]:
        """Model calls and photos so far, and the settings they ran under."""
        return {"model_calls": self.model_calls, "photos": self.photos, "max_batch": self.max_batch,
                "window_ms": self.max_wait * 1000.0}

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """One photo's uint8 pixels -> its row of logits."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((pixels, fut, time.perf_counter()))
        return await fut

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            x = np.stack([p for p, _, _ in batch])
            started = time.perf_counter()
            try:
                out = await asyncio.to_thread(self.fn, x)
            except Exception as e:  # hand the failure to every waiter, keep serving
                for _, f, _ in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.model_calls += 1
            self.photos += len(batch)
            if self.on_batch is not None:
                self.on_batch([started - t for _, _, t in batch], time.perf_counter() - started)
            for (_, f, _), row in zip(batch, out):
                if not f.done():
                    f.set_result(row)
