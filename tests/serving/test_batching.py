"""The in-process micro-batcher: concurrent photos share model calls, each gets its own row."""

import asyncio

import numpy as np
import pytest

from extendserve.serving.batching import MicroBatcher


def test_concurrent_submissions_share_calls_and_keep_order():
    seen = []

    def fn(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return x[:, :1] * 2

    async def go() -> list[np.ndarray]:
        b = MicroBatcher(fn, max_batch=8, max_wait_ms=20)
        return await asyncio.gather(*[b.submit(np.full((3,), i, np.float32)) for i in range(20)])

    out = asyncio.run(go())
    assert [float(o[0]) for o in out] == [2.0 * i for i in range(20)]
    assert sum(seen) == 20 and max(seen) == 8 and len(seen) < 20


def test_a_failing_call_fails_its_waiters_and_the_batcher_goes_on():
    calls = {"n": 0}

    def fn(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return x

    async def go() -> None:
        b = MicroBatcher(fn, max_batch=4, max_wait_ms=1)
        with pytest.raises(RuntimeError):
            await b.submit(np.zeros(2))
        assert (await b.submit(np.ones(2))).tolist() == [1.0, 1.0]

    asyncio.run(go())
