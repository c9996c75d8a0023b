"""The HTTP service: the merged ONNX model behind BentoML, on the GPU when there is one.

No torch here: onnxruntime, numpy and Pillow only. Decoding runs in worker threads, off the
event loop, and concurrent requests share model calls through a small in-process batcher.
Settings and the model are checked when this module is imported, in ``bentoml serve``'s main
process, so a bad one stops the whole service at once with the fix (see extendserve.served).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BaseModel, BeforeValidator, Field
from fastapi import FastAPI
from starlette.responses import FileResponse, JSONResponse, Response

try:
    import extendserve  # noqa: F401
except ImportError:  # inside a bento built from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from extendserve import __version__
from extendserve.batching import MicroBatcher
from extendserve.errors import BadImageError, ExtendserveError
from extendserve.runtime import DEVICES, Model
from extendserve.served import check_device, give_back_memory, served_model_dir, without_paths
from extendserve.store import DEFAULT_TAG, packed_tag
from extendserve.store import resolve as resolve_tag

from .edge import HttpEdge, error, strict_int

log = logging.getLogger("extendserve")


def _stop(msg: str) -> None:
    """Stop start-up with one line saying what to fix (no traceback)."""
    sys.stderr.write(f"extendserve: {msg}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _env(name: str, default: float, kind: type = int, least: float = 1, most: float = math.inf) -> Any:
    """A numeric setting from the environment; a bad or non-finite value stops start-up."""
    raw = os.environ.get(name)
    try:
        value = kind(raw) if raw is not None else kind(default)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not least <= value <= most:
        _stop(f"{name}={raw!r} is not valid; give a finite {kind.__name__} from {least} to {most}")
    return value


# The workers inherit this from the main process: glibc otherwise gives each decoding thread its own
# 64 MB malloc arena, and a worker's memory steps up by one whenever a new thread first decodes a
# photo (make burst: +6-10% growth over 1500 requests in six runs, +3-5% in two runs with two arenas).
os.environ.setdefault("MALLOC_ARENA_MAX", "2")
DEVICE = os.environ.get("EXTENDSERVE_DEVICE", "auto")
if DEVICE not in DEVICES:
    _stop(f"EXTENDSERVE_DEVICE={DEVICE!r} is not valid; give one of {', '.join(DEVICES)}")
MAX_UPLOAD = int(_env("EXTENDSERVE_MAX_UPLOAD_MB", 32, float, 0.001, 4096) * 1024 * 1024)
# Measured in bench/http_bench.py (docs/benchmarks.md), 16 clients on a 2-core CPU: one worker per
# core with one onnxruntime thread each serves 0.87-1.00 of the in-process rate, one worker with
# two threads 0.69-0.82 (its event loop, upload parsing and decoding share one GIL). Concurrent
# photos are batched within 4 ms, up to 32: with one worker batching was worth 0.82 vs 0.62; with
# two, window and size made no difference beyond noise on this CPU.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
WORKERS = _env("EXTENDSERVE_WORKERS", min(CORES, 4), int, 1, 64)
BATCH_MS = _env("EXTENDSERVE_BATCH_MS", 4, float, 0, 1000)
MAX_BATCH = _env("EXTENDSERVE_MAX_BATCH", 32, int, 1, 1024)
# Photos one /classify_batch request may carry, and how many of them enter the model queue at a
# time: a big batch then takes turns with single requests instead of queueing ahead of them.
MAX_BATCH_PHOTOS = _env("EXTENDSERVE_MAX_BATCH_PHOTOS", 256, int, 1, 100_000)
CHUNK = max(1, min(8, MAX_BATCH))
MAX_BODY_BATCH = int(_env("EXTENDSERVE_MAX_REQUEST_MB", 256, float, 0.001, 65536) * 1024 * 1024)
# Slow clients: a request body must arrive at EXTENDSERVE_MIN_UPLOAD_KBPS after a grace of
# EXTENDSERVE_UPLOAD_GRACE_S seconds, or is answered 408; only whole bodies are admitted as work,
# EXTENDSERVE_MAX_CONCURRENCY at a time per worker (429 past it). See service/edge.py.
DECODING = _env("EXTENDSERVE_MAX_DECODING", max(2, 2 * CORES // WORKERS), int, 1, 1024)  # photos per worker
MIN_RATE = _env("EXTENDSERVE_MIN_UPLOAD_KBPS", 16, float, 0, 1e6) * 1024
GRACE = _env("EXTENDSERVE_UPLOAD_GRACE_S", 5, float, 0.1, 600)
ADMITTED = _env("EXTENDSERVE_MAX_CONCURRENCY", 128, int, 1, 100_000)
THREADS = max(1, CORES // WORKERS)  # the workers split the cores rather than oversubscribe them
UI_PAGE = Path(__file__).with_name("ui.html")
SHOW_PATHS = os.environ.get("EXTENDSERVE_INFO_PATHS", "0") == "1"  # /info shows no server paths unless asked

# Which model: EXTENDSERVE_MODEL names a tag in BentoML's model store (default the demo's); for
# development EXTENDSERVE_MODEL_DIR names a folder instead. The main process resolves the tag once
# (``latest`` becomes a version) and its workers inherit the concrete tag, so a model saved later
# under the same name is not served by a worker that restarts.
MODEL_TAG: str | None = None
try:
    if os.environ.get("EXTENDSERVE_MODEL_DIR"):
        MODEL_SOURCE = Path(os.environ["EXTENDSERVE_MODEL_DIR"])
    else:
        packed, asked = packed_tag(__file__), os.environ.get("EXTENDSERVE_MODEL")
        if packed and asked and asked != packed:  # a bento serves the model it was built with
            log.warning("extendserve: this bento serves the model it packs, %s; EXTENDSERVE_MODEL=%s is ignored "
                        "(build another bento to serve another model)", packed, asked)
        wanted = packed or asked or DEFAULT_TAG
        MODEL_TAG, MODEL_SOURCE = resolve_tag(wanted)
        os.environ["EXTENDSERVE_MODEL"] = MODEL_TAG
    MODEL_DIR = served_model_dir(MODEL_SOURCE)  # checked and pinned once, in the main process
    if os.environ.get("EXTENDSERVE_DEVICE_CHECKED") != str(MODEL_DIR):
        check_device(MODEL_DIR, DEVICE)
        os.environ["EXTENDSERVE_DEVICE_CHECKED"] = str(MODEL_DIR)  # the workers inherit it: checked once
except (ExtendserveError, OSError) as e:
    _stop(str(e))


TopK = Annotated[int, BeforeValidator(strict_int)]


class Prediction(BaseModel):
    label: str
    index: int = Field(description="column of the model's output (the base's classes first, then each head's)")
    score: float = Field(description="probability over all classes (the model's scores output)")
    head: str = Field(description="which head the class belongs to ('imagenet' or 'base': the original classes)")


class Classification(BaseModel):
    predictions: list[Prediction]

class Info(BaseModel):
    """GET /info: which model this service serves, and how."""

    model_tag: str | None = Field(description="the BentoML store tag served (None: a folder, EXTENDSERVE_MODEL_DIR)")
    model_version: str | None
    model_sha256: str
    model_dir: str | None = Field(description="the model folder served (EXTENDSERVE_INFO_PATHS=1 only)")
    pinned_copy: str | None = Field(description="the private copy the workers load (EXTENDSERVE_INFO_PATHS=1 only)")
    labels: list[str]
    heads: list[dict[str, Any]]
    backbone: dict[str, Any] = Field(description="the base classifier the heads sit beside")
    preprocess: dict[str, Any]
    verification: dict[str, Any]
    opset: int | None
    device: str
    providers: list[str]
    versions: dict[str, str]


# A FastAPI app, so that BentoML puts /info and /ui into the service's OpenAPI spec beside its APIs.
pages = FastAPI(title="extendserve pages")


@pages.get("/info", response_model=Info)
async def info() -> dict[str, Any]:
    return bentoml.get_current_service().info_payload()


@pages.get("/ui", response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
async def ui() -> Response:
    return FileResponse(UI_PAGE, media_type="text/html")


@bentoml.asgi_app(pages, path="/")
@bentoml.service(name="extendserve-classifier", traffic={"timeout": 60}, workers=WORKERS)
class Classifier:
    # Declared here, as a class attribute, so that `bentoml build` packs the model by reference.
    if MODEL_TAG is not None:
        bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        try:
            self.model = Model(MODEL_DIR, device=DEVICE, threads=THREADS)
        except ExtendserveError as e:
            # A worker that cannot load the model checked at start-up (CUDA missing, say) ends the
            # whole service rather than being restarted in a loop while the port stays open.
            log.error("extendserve: %s", e)
            os.kill(os.getppid(), signal.SIGTERM)
            raise SystemExit(2) from None
        log.warning("extendserve: serving %s (pinned copy %s) on %s (providers: %s)", MODEL_TAG or MODEL_SOURCE, MODEL_DIR,
                    self.model.device.upper(), ", ".join(self.model.session.get_providers()))
        self.model.warm_up((1, 8, MAX_BATCH))  # grow memory arenas to the largest batch now
        # An in-process batcher rather than @bentoml.api(batchable=True): a batchable API takes exactly
        # one argument ("Batch inference function only accept one argument", BentoML 1.4's
        # batch_infer), so /classify's top_k and /classify_batch's many photos a request would need a
        # second service and a hop between processes. Measured (bench/http_bench.py, 16 clients, this
        # 2-core CPU): batching concurrent photos within 4 ms served 0.82 of the in-process rate
        # against 0.62 without, with one worker.
        self.batcher = MicroBatcher(self.model.probabilities, max_batch=MAX_BATCH, max_wait_ms=BATCH_MS)
        # Photos decoded at once on this worker, whatever the number of requests: a decoded 12 MP
        # photo is 36 MB, and six concurrent batches once took a worker from 333 MB to 1 GB for good.
        self.decoding = asyncio.Semaphore(DECODING)
        self.batches = 0  # batch requests in progress; the last one out gives memory back

    def info_payload(self) -> dict[str, Any]:
        import onnxruntime

        m = self.model.manifest
        payload = {
            "labels": m["labels"],
            "heads": m["heads"],
            "backbone": m["backbone"],
            "preprocess": m["preprocess"],
            "verification": m["verification"],
            "opset": m.get("opset"),
            "model_sha256": m["model_sha256"],
            "model_tag": MODEL_TAG,
            "model_version": MODEL_TAG.split(":")[1] if MODEL_TAG else None,
            "model_dir": str(MODEL_SOURCE),
            "pinned_copy": str(self.model.dir),
            "device": self.model.device,
            "providers": self.model.session.get_providers(),
            "versions": {"extendserve": __version__, "onnxruntime": onnxruntime.__version__,
                         "bentoml": bentoml.__version__, "numpy": np.__version__,
                         "python": sys.version.split()[0]},
        }
        # Server paths (training folders, head files, the store) only where a setting asks for them.
        return payload if SHOW_PATHS else without_paths(payload | {"model_dir": None, "pinned_copy": None})

    async def _prepare(self, photo: Path | bytes, name: str) -> np.ndarray:
        """An uploaded file or a raw body -> the model's pixels, size-checked before it is read."""
        size = len(photo) if isinstance(photo, bytes) else photo.stat().st_size
        if size > MAX_UPLOAD:
            raise _TooLarge(f"{name}: {size / 2**20:.1f} MB is over the {MAX_UPLOAD / 2**20:.0f} MB upload limit")
        read = (lambda: photo) if isinstance(photo, bytes) else photo.read_bytes
        async with self.decoding:
            return await asyncio.to_thread(lambda: self.model.prepare(read(), name))

    async def classify_one(self, photo: Path | bytes, top_k: int) -> Classification | JSONResponse:
        out = await self._classify([photo], top_k)
        return out if isinstance(out, JSONResponse) else out[0]

    async def _classify(self, paths: list[Path | bytes], top_k: int) -> list[Classification] | JSONResponse:
        if not 1 <= top_k <= len(self.model.labels):
            return error(400, f"top_k must be between 1 and {len(self.model.labels)}, not {top_k}")
        rows: list[np.ndarray] = []
        try:
            # A chunk at a time: a batch of hundreds takes turns in the decode threads and the model
            # queue with single requests, rather than queueing all its photos ahead of theirs.
            for start in range(0, len(paths), CHUNK):
                chunk = paths[start : start + CHUNK]
                pixels = await asyncio.gather(*[self._prepare(p, f"image {start + i}" if len(paths) > 1 else "image")
                                                for i, p in enumerate(chunk)])
                rows += await asyncio.gather(*[self.batcher.submit(x) for x in pixels])
        except _TooLarge as e:
            return error(413, str(e))
        except BadImageError as e:
            return error(400, str(e))
        preds = self.model.top_k(np.stack(rows), top_k)
        return [Classification(predictions=[Prediction(**p.to_dict()) for p in row]) for row in preds]

    @bentoml.api
    async def classify(self, image: Path, top_k: TopK = 5) -> Classification:
        """One photo (multipart field ``image``) -> its top-k labels, scores and heads."""
        return await self.classify_one(image, top_k)  # type: ignore[return-value]

    @bentoml.api
    async def classify_batch(self, images: list[Path], top_k: TopK = 5) -> list[Classification]:
        """Several photos (multipart field ``images``, repeated) -> one result each, in order."""
        if not images:
            return error(400, "no photos: send one or more multipart fields named 'images'")  # type: ignore[return-value]
        if len(images) > MAX_BATCH_PHOTOS:
            return error(413, f"{len(images)} photos in one request is over the limit of {MAX_BATCH_PHOTOS} "  # type: ignore[return-value]
                               "(EXTENDSERVE_MAX_BATCH_PHOTOS); split them over several requests")
        self.batches += 1
        try:
            return await self._classify(images, top_k)  # type: ignore[return-value]
        finally:
            self.batches -= 1
            if not self.batches:
                await asyncio.to_thread(give_back_memory)


Classifier.add_asgi_middleware(HttpEdge, limit=MAX_UPLOAD + 64 * 1024, batch_limit=MAX_BODY_BATCH,
                               min_rate=MIN_RATE, grace=GRACE, admitted=ADMITTED)


class _TooLarge(Exception):
    pass
