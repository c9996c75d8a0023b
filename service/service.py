"""The HTTP service: the merged ONNX model behind BentoML, on the GPU when there is one.

No torch here: onnxruntime, numpy and Pillow only. Decoding runs in worker threads, off the
event loop, and concurrent requests share model calls through a small in-process batcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

try:
    import extendserve  # noqa: F401
except ImportError:  # inside a bento built from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from extendserve import __version__
from extendserve.batching import MicroBatcher
from extendserve.errors import BadImageError, ExtendserveError
from extendserve.runtime import Model, softmax

log = logging.getLogger("extendserve")


def _env(name: str, default: float, kind: type = int, least: float = 1) -> Any:
    """A numeric setting from the environment; a bad value stops start-up with the fix."""
    raw = os.environ.get(name)
    try:
        value = kind(raw) if raw is not None else kind(default)
    except ValueError:
        value = None
    if value is None or value < least:
        raise SystemExit(f"extendserve: {name}={raw!r} is not valid; give a {kind.__name__} >= {least}")
    return value


MODEL_DIR = os.environ.get("EXTENDSERVE_MODEL_DIR", "models/default")
DEVICE = os.environ.get("EXTENDSERVE_DEVICE", "auto")
MAX_UPLOAD = _env("EXTENDSERVE_MAX_UPLOAD_MB", 32, float, 0.001) * 1024 * 1024
# Measured in bench/http_bench.py (docs/benchmarks.md), 16 clients on a 2-core CPU: one worker per
# core with one onnxruntime thread each serves 0.87-1.00 of the in-process rate, one worker with
# two threads 0.69-0.82 (its event loop, upload parsing and decoding share one GIL). Concurrent
# photos are batched within 4 ms, up to 32: with one worker batching was worth 0.82 vs 0.62; with
# two, window and size made no difference beyond noise on this CPU.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
WORKERS = _env("EXTENDSERVE_WORKERS", min(CORES, 4))
BATCH_MS = _env("EXTENDSERVE_BATCH_MS", 4, float, 0)
MAX_BATCH = _env("EXTENDSERVE_MAX_BATCH", 32)
THREADS = max(1, CORES // WORKERS)  # the workers split the cores rather than oversubscribe them
UI_PAGE = Path(__file__).with_name("ui.html")

pages = Starlette()
_service: dict[str, "Classifier"] = {}


async def info(request: Request) -> Response:
    return JSONResponse(_service["svc"].info_payload())


async def ui(request: Request) -> Response:
    return FileResponse(UI_PAGE, media_type="text/html")


pages.add_route("/info", info, methods=["GET"])
pages.add_route("/ui", ui, methods=["GET"])


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@bentoml.asgi_app(pages, path="/")
@bentoml.service(traffic={"timeout": 60, "max_concurrency": 256}, workers=WORKERS)
class Classifier:
    def __init__(self) -> None:
        try:
            self.model = Model(MODEL_DIR, device=DEVICE, threads=THREADS)
        except ExtendserveError as e:
            raise SystemExit(f"extendserve: {e}") from None
        log.warning("extendserve: serving %s on %s (providers: %s)", MODEL_DIR, self.model.device.upper(),
                    ", ".join(self.model.session.get_providers()))
        self.model.warm_up((1, 8, MAX_BATCH))  # grow memory arenas to the largest batch now
        self.batcher = MicroBatcher(self.model.run, max_batch=MAX_BATCH, max_wait_ms=BATCH_MS)
        _service["svc"] = self

    def info_payload(self) -> dict[str, Any]:
        import onnxruntime

        m = self.model.manifest
        return {
            "labels": m["labels"],
            "heads": m["heads"],
            "backbone": m["backbone"],
            "preprocess": m["preprocess"],
            "verification": m["verification"],
            "opset": m.get("opset"),
            "model_dir": str(self.model.dir),
            "device": self.model.device,
            "providers": self.model.session.get_providers(),
            "versions": {"extendserve": __version__, "onnxruntime": onnxruntime.__version__,
                         "bentoml": bentoml.__version__, "numpy": np.__version__,
                         "python": sys.version.split()[0]},
        }

    async def _prepare(self, path: Path, name: str) -> np.ndarray:
        size = path.stat().st_size
        if size > MAX_UPLOAD:
            raise _TooLarge(f"{name}: {size / 2**20:.1f} MB is over the {MAX_UPLOAD / 2**20:.0f} MB upload limit")
        return await asyncio.to_thread(lambda: self.model.prepare(path.read_bytes(), name))

    async def _classify(self, paths: list[Path], top_k: int) -> list[dict[str, Any]] | JSONResponse:
        if not 1 <= top_k <= len(self.model.labels):
            return _error(400, f"top_k must be between 1 and {len(self.model.labels)}, not {top_k}")
        try:
            pixels = await asyncio.gather(*[self._prepare(p, f"image {i}" if len(paths) > 1 else "image")
                                            for i, p in enumerate(paths)])
        except _TooLarge as e:
            return _error(413, str(e))
        except BadImageError as e:
            return _error(400, str(e))
        logits = await asyncio.gather(*[self.batcher.submit(x) for x in pixels])
        preds = self.model.top_k(softmax(np.stack(logits)), top_k)
        return [{"predictions": [p.to_dict() for p in row]} for row in preds]

    @bentoml.api
    async def classify(self, image: Path, top_k: int = 5) -> dict[str, Any]:
        """One photo (multipart field ``image``) -> its top-k labels, scores and heads."""
        out = await self._classify([image], top_k)
        return out if isinstance(out, JSONResponse) else out[0]  # type: ignore[return-value]

    @bentoml.api
    async def classify_batch(self, images: list[Path], top_k: int = 5) -> list[dict[str, Any]]:
        """Several photos (multipart field ``images``, repeated) -> one result each, in order."""
        if not images:
            return _error(400, "no photos: send one or more multipart fields named 'images'")  # type: ignore[return-value]
        return await self._classify(images, top_k)  # type: ignore[return-value]


class _TooLarge(Exception):
    pass
