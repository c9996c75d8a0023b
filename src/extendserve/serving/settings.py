"""The service's settings, read once from the environment and checked: a bad or non-finite value
is an error naming the variable and what it takes, and stops the whole service. No torch here."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..engines import ENGINES
from ..errors import ExtendserveError
from ..sessions import DEVICES


def env_number(env: Mapping[str, str], name: str, default: float, kind: type = int, least: float = 1,
            most: float = math.inf) -> Any:
    raw = env.get(name)
    try:
        value = kind(raw) if raw is not None else kind(default)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not least <= value <= most:
        raise ExtendserveError(f"{name}={raw!r} is not valid; give a finite {kind.__name__} from {least} to {most}")
    return value


def cores() -> int:
    """CPUs this process may use: the CPUs it may run on, capped by its cgroup's CPU quota (a
    container given 2 CPUs on a 64-core host must start 2 workers' worth of threads, not 64)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpus()
    return max(1, min(n, math.ceil(quota))) if quota else n


def cgroup_cpus(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup, in CPUs (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), or None where there is none."""
    from pathlib import Path

    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        own = []
    v2 = next((ln.split(":", 2)[2] for ln in own if ln.startswith("0::")), None)
    v1 = next((ln.split(":", 2)[2] for ln in own if "cpu" in ln.split(":")[1].split(",")), None)
    candidates = []
    if v2 is not None:
        candidates += [(Path(root) / v2.lstrip("/") / "cpu.max", None), (Path(root) / "cpu.max", None)]
    if v1 is not None:
        for base in ("cpu,cpuacct", "cpu"):
            candidates += [(Path(root) / base / v1.lstrip("/") / "cpu.cfs_quota_us", "v1"),
                           (Path(root) / base / "cpu.cfs_quota_us", "v1")]
    for path, kind in candidates:
        try:
            if kind is None:
                quota, period = path.read_text().split()[:2]
            else:
                quota, period = path.read_text().strip(), (path.parent / "cpu.cfs_period_us").read_text().strip()
            if quota not in ("max", "-1") and int(period) > 0:
                return int(quota) / int(period)
            if quota in ("max", "-1"):
                return None
        except (OSError, ValueError):
            continue
    return None


@dataclass(frozen=True)
class ServiceSettings:
    device: str  # EXTENDSERVE_DEVICE: auto | cuda | cpu
    workers: int  # one per core, at most 4 (bench/serving/http_bench.py: 0.87-1.00 of the in-process rate)
    threads: int  # onnxruntime threads per worker: the workers split the cores
    batch_ms: float  # batching window; concurrent photos share model calls
    max_batch: int
    max_upload: int  # bytes a /classify body may hold
    max_request: int  # bytes a /classify_batch body may hold
    max_batch_photos: int  # photos a /classify_batch request may carry
    chunk: int  # photos of one batch request that enter the model queue at a time
    decoding: int  # photos decoded at once per worker, whatever the number of requests
    min_rate: float  # bytes/s a request body must arrive at after the grace (else 408)
    grace: float  # seconds
    admitted: int  # requests in progress per worker (429 past it); uploads still arriving do not count
    show_paths: bool  # /info shows server paths (EXTENDSERVE_INFO_PATHS=1)
    max_buffered: int | None = None  # EXTENDSERVE_MAX_BUFFERED_MB: each worker's memory budget (None: from the cgroup)
    engine: str = "auto"  # EXTENDSERVE_ENGINE: auto (measured, see engines) | onnxruntime | openvino
    request_set: bool = False  # EXTENDSERVE_MAX_REQUEST_MB given (else it follows the budget)
    heal_s: float = 120.0  # EXTENDSERVE_HEAL_S: a worker dead and unreplaced this long fails /livez

    def memory_budget(self, model_bytes: int, limit: int | None = None) -> tuple[int, str]:
        """Each worker's memory budget for requests, and where it came from (see serving.budget): set,
        or what the cgroup's memory limit leaves each worker. A budget that cannot hold one photo of
        the upload limit, or workers whose budgets cannot fit the limit, stop the start with the sums."""
        from .budget import MAIN_BASE, MB, WORKER_BASE, cgroup_memory, default_budget

        limit = cgroup_memory() if limit is None else limit
        if self.max_buffered is not None:
            budget, source = self.max_buffered, "EXTENDSERVE_MAX_BUFFERED_MB"
            if limit is not None:
                need = MAIN_BASE + self.workers * (WORKER_BASE + model_bytes + budget)
                if need > limit:
                    raise ExtendserveError(
                        f"EXTENDSERVE_MAX_BUFFERED_MB={budget / MB:.0f} cannot fit the cgroup's memory limit of "
                        f"{limit / MB:.0f} MB: {MAIN_BASE / MB:.0f} MB main + {self.workers} workers x ({WORKER_BASE / MB:.0f}"
                        f" MB baseline + {model_bytes / MB:.0f} MB model + {budget / MB:.0f} MB budget) = {need / MB:.0f} MB;"
                        " lower it, use fewer workers (EXTENDSERVE_WORKERS) or raise the limit")
        else:
            budget, source = default_budget(self.workers, limit, model_bytes)
        if budget < self.max_upload:
            raise ExtendserveError(
                f"each worker's memory budget is {budget / MB:.0f} MB ({source}), under the "
                f"{self.max_upload / MB:.0f} MB upload limit (EXTENDSERVE_MAX_UPLOAD_MB): no photo of that size could be "
                "held; lower EXTENDSERVE_MAX_UPLOAD_MB, use fewer workers (EXTENDSERVE_WORKERS) or give the pod more memory")
        if self.request_set and self.max_request > budget:
            raise ExtendserveError(
                f"EXTENDSERVE_MAX_REQUEST_MB={self.max_request / MB:.0f} is over each worker's memory budget of "
                f"{budget / MB:.0f} MB ({source}); no request that large could be held: lower it")
        return budget, source

    def batch_for(self, device: str) -> int:
        """The batcher's largest batch: the setting, else 32 on CUDA and 4 on the CPU. On this 2-core
        EPYC one worker's onnxruntime (one thread) runs as fast at batch 4 as at 1 and faster than at 8,
        16 or 32 (181, 188, 171, 160, 145 photos/s) while its memory grows with the batch (148, 175,
        234, 321, 516 MB): python bench/serving/worker_memory.py, docs/benchmarks.md."""
        return self.max_batch or (32 if device == "cuda" else 4)

    def request_limit(self, budget: int) -> int:
        """Bytes a batch or /v2 body may hold: the setting, else at most half the budget (its photos
        must still be decoded within it)."""
        return self.max_request if self.request_set else min(self.max_request, max(self.max_upload, budget // 2))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServiceSettings:
        device = env.get("EXTENDSERVE_DEVICE", "auto")
        if device not in DEVICES:
            raise ExtendserveError(f"EXTENDSERVE_DEVICE={device!r} is not valid; give one of {', '.join(DEVICES)}")
        engine = env.get("EXTENDSERVE_ENGINE", "auto")
        if engine not in ENGINES:
            raise ExtendserveError(f"EXTENDSERVE_ENGINE={engine!r} is not valid; give one of {', '.join(ENGINES)}")
        n = cores()
        workers = env_number(env, "EXTENDSERVE_WORKERS", min(n, 4), int, 1, 64)
        # 0: by device (see batch_for); a CPU serves no faster in batches over 4 and holds far more
        max_batch = env_number(env, "EXTENDSERVE_MAX_BATCH", 0, int, 0, 1024)
        max_request = int(env_number(env, "EXTENDSERVE_MAX_REQUEST_MB", 256, float, 0.001, 65536) * 2**20)
        return cls(
            device=device, workers=workers, threads=max(1, n // workers),
            batch_ms=env_number(env, "EXTENDSERVE_BATCH_MS", 4, float, 0, 1000), max_batch=max_batch,
            max_upload=int(env_number(env, "EXTENDSERVE_MAX_UPLOAD_MB", 32, float, 0.001, 4096) * 2**20),
            max_request=max_request,
            # at least one whole request of the largest size, whatever is set
            max_buffered=(int(env_number(env, "EXTENDSERVE_MAX_BUFFERED_MB", 384, float, 1, 1e6) * 2**20)
                          if "EXTENDSERVE_MAX_BUFFERED_MB" in env else None),
            request_set="EXTENDSERVE_MAX_REQUEST_MB" in env,
            heal_s=env_number(env, "EXTENDSERVE_HEAL_S", 120, float, 1, 86400),
            max_batch_photos=env_number(env, "EXTENDSERVE_MAX_BATCH_PHOTOS", 256, int, 1, 100_000),
            chunk=max(1, min(8, max_batch or 8)),
            decoding=env_number(env, "EXTENDSERVE_MAX_DECODING", max(2, 2 * n // workers), int, 1, 1024),
            min_rate=env_number(env, "EXTENDSERVE_MIN_UPLOAD_KBPS", 16, float, 0, 1e6) * 1024,
            grace=env_number(env, "EXTENDSERVE_UPLOAD_GRACE_S", 5, float, 0.1, 600),
            admitted=env_number(env, "EXTENDSERVE_MAX_CONCURRENCY", 128, int, 1, 100_000),
            show_paths=env.get("EXTENDSERVE_INFO_PATHS", "0") == "1", engine=engine,
        )
