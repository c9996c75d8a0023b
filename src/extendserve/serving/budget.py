"""One worker's memory budget for requests: every byte a request holds is taken from it first.

Bodies as they arrive, bodies read and waiting, a photo's copy for decoding and its decoded
pixels are all taken from one count per worker before they are held, and given back when the
request is answered. Past the budget a request is refused at once (503 with Retry-After), so a
worker's memory is its baseline plus at most its budget, whatever its clients send. The budget
follows the pod: by default it is what the cgroup's memory limit leaves each worker after the model
(see :func:`default_budget`). No torch here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

MB = 2**20


class OverBudget(Exception):
    """A request that would take this worker over its memory budget (answered 503, Retry-After)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class MemoryBudget:
    """Bytes held for requests on this worker: taken before they are held, given back when done."""

    def __init__(self, limit: int, source: str = "EXTENDSERVE_MAX_BUFFERED_MB"):
        self.limit, self.source = int(limit), source
        self.held = self.peak = self.refused = 0
        self._high = 0  # the most held since memory was last given back to the system
        self._lock = threading.Lock()  # decode threads give back too
        self.on_change: Callable[[int, bool], None] | None = None  # told the bytes held after each change, and refusals

    def take(self, n: int, what: str) -> None:
        """Take ``n`` bytes for ``what``, or raise :class:`OverBudget` holding nothing."""
        with self._lock:
            if self.held + n > self.limit:
                self.refused += 1
                if self.on_change is not None:
                    self.on_change(self.held, True)
                raise OverBudget(f"this worker holds {self.held / MB:.0f} MB for requests in progress and {what} needs "
                                 f"{n / MB:.1f} MB more, over its {self.limit / MB:.0f} MB budget ({self.source}); "
                                 "retry shortly")
            self.held += n
            self.peak = max(self.peak, self.held)
            self._high = max(self._high, self.held)
            if self.on_change is not None:
                self.on_change(self.held, False)

    def give(self, n: int) -> None:
        with self._lock:
            self.held = max(0, self.held - n)
            if self.on_change is not None:
                self.on_change(self.held, False)

    def idle_after(self, least: int) -> bool:
        """True once, when nothing is held and at least ``least`` bytes were held since the last time:
        the moment to give freed heap pages back to the system (glibc keeps them otherwise)."""
        with self._lock:
            if self.held or self._high < least:
                return False
            self._high = 0
            return True

    def stats(self) -> dict[str, int | str]:
        return {"budget_bytes": self.limit, "held_bytes": self.held, "peak_bytes": self.peak,
                "refused": self.refused, "budget_from": self.source}


class Held:
    """What one request took from a budget, given back at once when it is done (``with``)."""

    def __init__(self, budget: MemoryBudget):
        self.budget, self.bytes = budget, 0

    def take(self, n: int, what: str) -> None:
        self.budget.take(n, what)
        self.bytes += n

    def give(self, n: int) -> None:
        n = min(n, self.bytes)
        self.budget.give(n)
        self.bytes -= n

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.give(self.bytes)


def cgroup_memory(root: str = "/sys/fs/cgroup") -> int | None:
    """This process's cgroup memory limit in bytes (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), or None where there is none."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2 = next((ln.split(":", 2)[2] for ln in own if ln.startswith("0::")), None)
    v1 = next((ln.split(":", 2)[2] for ln in own if "memory" in ln.split(":")[1].split(",")), None)
    candidates = []
    if v2 is not None:
        candidates += [Path(root) / v2.lstrip("/") / "memory.max", Path(root) / "memory.max"]
    if v1 is not None:
        candidates += [Path(root) / "memory" / v1.lstrip("/") / "memory.limit_in_bytes",
                       Path(root) / "memory" / "memory.limit_in_bytes"]
    for path in candidates:
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw == "max":
            return None
        try:
            value = int(raw)
        except ValueError:
            continue
        return value if value < 2**60 else None  # v1 says "no limit" with a huge number
    return None


# What a worker holds besides its model and its requests (onnxruntime's arena warmed to the CPU's
# batch, BentoML, Python: 331-344 MB RSS with the 20 MB model after 16 clients for 10 s), and the
# main process (128 MB, 158 MB at its peak), with some room: docs/benchmarks.md ("Memory").
WORKER_BASE = 350 * MB
MAIN_BASE = 160 * MB
DEFAULT_BUDGET = 384 * MB  # with no cgroup limit


def default_budget(workers: int, limit: int | None, model_bytes: int) -> tuple[int, str]:
    """Each worker's budget and where it came from: with a cgroup limit, what the limit leaves after
    the main process and every worker's baseline (the model counted once more per worker, its
    session's copy), with a fifth kept spare; else 384 MB."""
    if limit is None:
        return DEFAULT_BUDGET, "default (no cgroup memory limit)"
    spare = limit // 5
    per_worker = (limit - spare - MAIN_BASE - workers * (WORKER_BASE + model_bytes)) // workers
    return per_worker, (f"cgroup memory limit {limit / MB:.0f} MB: ({limit / MB:.0f} - {spare / MB:.0f} spare - "
                        f"{MAIN_BASE / MB:.0f} main - {workers} x {(WORKER_BASE + model_bytes) / MB:.0f} worker) / {workers}")
