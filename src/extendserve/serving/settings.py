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


def _number(env: Mapping[str, str], name: str, default: float, kind: type = int, least: float = 1,
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
    max_buffered: int = 384 * 2**20  # bytes of request bodies still arriving, per worker (503 past it)
    engine: str = "auto"  # EXTENDSERVE_ENGINE: auto (measured, see engines) | onnxruntime | openvino

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServiceSettings:
        device = env.get("EXTENDSERVE_DEVICE", "auto")
        if device not in DEVICES:
            raise ExtendserveError(f"EXTENDSERVE_DEVICE={device!r} is not valid; give one of {', '.join(DEVICES)}")
        engine = env.get("EXTENDSERVE_ENGINE", "auto")
        if engine not in ENGINES:
            raise ExtendserveError(f"EXTENDSERVE_ENGINE={engine!r} is not valid; give one of {', '.join(ENGINES)}")
        n = cores()
        workers = _number(env, "EXTENDSERVE_WORKERS", min(n, 4), int, 1, 64)
        max_batch = _number(env, "EXTENDSERVE_MAX_BATCH", 32, int, 1, 1024)
        max_request = int(_number(env, "EXTENDSERVE_MAX_REQUEST_MB", 256, float, 0.001, 65536) * 2**20)
        return cls(
            device=device, workers=workers, threads=max(1, n // workers),
            batch_ms=_number(env, "EXTENDSERVE_BATCH_MS", 4, float, 0, 1000), max_batch=max_batch,
            max_upload=int(_number(env, "EXTENDSERVE_MAX_UPLOAD_MB", 32, float, 0.001, 4096) * 2**20),
            max_request=max_request,
            # at least one whole request of the largest size, whatever is set
            max_buffered=max(max_request, int(_number(env, "EXTENDSERVE_MAX_BUFFERED_MB", 384, float, 1, 1e6) * 2**20)),
            max_batch_photos=_number(env, "EXTENDSERVE_MAX_BATCH_PHOTOS", 256, int, 1, 100_000),
            chunk=max(1, min(8, max_batch)),
            decoding=_number(env, "EXTENDSERVE_MAX_DECODING", max(2, 2 * n // workers), int, 1, 1024),
            min_rate=_number(env, "EXTENDSERVE_MIN_UPLOAD_KBPS", 16, float, 0, 1e6) * 1024,
            grace=_number(env, "EXTENDSERVE_UPLOAD_GRACE_S", 5, float, 0.1, 600),
            admitted=_number(env, "EXTENDSERVE_MAX_CONCURRENCY", 128, int, 1, 100_000),
            show_paths=env.get("EXTENDSERVE_INFO_PATHS", "0") == "1", engine=engine,
        )
