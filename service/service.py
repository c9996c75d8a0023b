"""The HTTP service: the merged ONNX model behind BentoML, on the GPU when there is one.

No torch here. Decoding runs in worker threads, off the event loop; concurrent requests share model
calls through a small in-process batcher. Settings and the model are checked when this module is
imported, in ``bentoml serve``'s main process: a bad one stops the service with the fix.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from fastapi import FastAPI
from starlette.responses import FileResponse, Response

try:
    import extendserve  # noqa: F401
except ImportError:  # inside a bento built from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from extendserve.errors import ExtendserveError
from extendserve.serving.batching import MicroBatcher
from extendserve.serving.budget import MemoryBudget
from extendserve.serving.readiness import ReadyMarks, replace_dead_workers
from extendserve.serving.runtime import Model
from extendserve.serving.served import engine_choice, resolve_served_model
from extendserve.serving.settings import ServiceSettings

from .decoding import Decoding
from .edge import ClientError, HttpEdge, answers_client_errors
from .metrics import bound_bentoml_metrics
from .review import Review
from .schema import Classification, Info, MinScore, TopK, info_payload, with_description
from .series import Series
from .v2 import attach as attach_v2

log = logging.getLogger("extendserve")


def _stop(msg: str) -> None:
    """Stop start-up with one line saying what to fix (no traceback)."""
    sys.stderr.write(f"extendserve: {msg}\n")
    sys.stderr.flush()
    raise SystemExit(2)


# The workers inherit this from the main process: glibc otherwise gives each decoding thread its own
# 64 MB malloc arena, and a worker's memory steps up by one whenever a new thread first decodes a
# photo (make burst: +6-10% growth over 1500 requests in six runs, +3-5% in two runs with two arenas).
os.environ.setdefault("MALLOC_ARENA_MAX", "2")
UI_PAGE = Path(__file__).with_name("ui.html")
replace_dead_workers()  # in the image too (see extendserve.serving.readiness)
try:  # checked in bentoml serve's main process: a bad setting or model stops the whole service
    S = ServiceSettings.from_env()
    MODEL_TAG, MODEL_SOURCE, MODEL_DIR = resolve_served_model(__file__, S.device)
    ENGINE_REPORT = engine_choice(MODEL_DIR, S)  # the CPU engine, chosen once here for every worker
    READY = ReadyMarks.for_service()
    # One memory budget per worker for all its requests hold: set, or what the pod's limit leaves it.
    BUDGET = MemoryBudget(*S.memory_budget((MODEL_DIR / "model.onnx").stat().st_size))
    REQUEST_LIMIT = S.request_limit(BUDGET.limit)
    REVIEW = Review.from_env()  # opt-in: photos answered 'unknown' or unsure, kept for a person to look at
except (ExtendserveError, OSError) as e:
    _stop(str(e))


pages = FastAPI(title="extendserve pages")  # so that BentoML puts /info and /ui into the OpenAPI spec


@pages.get("/info", response_model=Info)
async def info() -> dict[str, Any]:
    return bentoml.get_current_service().info_payload()


attach_v2(pages)  # the Open Inference Protocol (KServe v2) under /v2


@pages.get("/ui", response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
async def ui() -> Response:
    return FileResponse(UI_PAGE, media_type="text/html")


@bentoml.asgi_app(pages, path="/")
@bentoml.service(name="extendserve-classifier", traffic={"timeout": 60}, workers=S.workers)
class Classifier:
    if MODEL_TAG is not None:  # a class attribute, so that `bentoml build` packs the model by reference
        bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        try:
            self.model = Model(MODEL_DIR, device=S.device, threads=S.threads, engine=S.engine, decided=ENGINE_REPORT)
        except ExtendserveError as e:
            # A worker that cannot load the model checked at start-up (CUDA missing, say) ends the
            # whole service rather than being restarted in a loop while the port stays open.
            log.error("extendserve: %s", e)
            os.kill(os.getppid(), signal.SIGTERM)
            raise SystemExit(2) from None
        log.setLevel(logging.INFO)  # serving on the CPU is a normal state, not a WARNING
        log.info("extendserve: serving %s (pinned copy %s) on %s with %s (providers: %s)", MODEL_TAG or MODEL_SOURCE,
                    MODEL_DIR, self.model.device.upper(), self.model.engine.name,
                    ", ".join(self.model.providers))
        max_batch = S.batch_for(self.model.device)
        self.model.warm_up(sorted({1, max_batch}))  # grow memory arenas to the largest batch now
        # An in-process batcher, not @bentoml.api(batchable=True), whose one argument leaves no room for top_k
        # (bench/serving/http_bench.py, 16 clients, 2 cores: 0.82 of the in-process rate within 4 ms, 0.62 without).
        self.batcher = MicroBatcher(self.model.probabilities, max_batch=max_batch, max_wait_ms=S.batch_ms)
        self.series = Series.attach(self.model, self.v2_name, S.workers, BUDGET, self.batcher, READY)  # own series
        self.decode = Decoding(self.model, BUDGET, S.max_upload, S.decoding, self.series.decoded)
        READY.mark()

    def __is_ready__(self) -> bool:
        """Every worker has loaded and warmed up the model (BentoML's /readyz asks this)."""
        return READY.all(S.workers)

    def __is_alive__(self) -> bool:
        """BentoML's /livez: false once a worker that died has gone unreplaced for EXTENDSERVE_HEAL_S."""
        return READY.alive(S.workers, S.heal_s)

    # The Open Inference Protocol's name for this model (its store name, else its folder's) and version.
    v2_name = MODEL_TAG.split(":")[0] if MODEL_TAG else Path(MODEL_SOURCE).name
    settings = S
    budget = BUDGET

    @property
    def v2_version(self) -> str:
        return MODEL_TAG.split(":")[1] if MODEL_TAG else self.model.manifest.model_sha256[:12]

    def info_payload(self) -> dict[str, Any]:
        # Server paths (training folders, head files, the store) only where a setting asks for them.
        return info_payload(self.model, self.batcher.stats(), S, MODEL_TAG, MODEL_SOURCE, READY.count(),
                            BUDGET.stats() | {"request_limit_bytes": REQUEST_LIMIT})

    async def classify_many(self, photos: list[Any], top_k: int, min_score: float | None = None,
                            gone: Callable[[], Awaitable[bool]] | None = None,
                            endpoint: str = "classify") -> list[Classification]:
        """Photos (bytes, views or files) -> one Classification each, in order (/classify, /classify_batch)."""
        try:
            self.model.check_top_k(top_k)
        except ExtendserveError as e:
            raise ClientError(400, str(e)) from None
        answers = self.series.answer(np.stack(await self.scores(photos, gone)), top_k, min_score, endpoint)
        if REVIEW is not None:
            await REVIEW.keep(photos, answers)
        return [Classification(predictions=row) for row in answers]

    async def classify_batch_of(self, photos: list[Any], top_k: int, min_score: float | None = None,
                                gone: Callable[[], Awaitable[bool]] | None = None) -> list[Classification]:
        if not photos:
            raise ClientError(400, "no photos: send one or more multipart fields named 'images'")
        if len(photos) > S.max_batch_photos:
            raise ClientError(413, f"{len(photos)} photos in one request is over the limit of {S.max_batch_photos} "
                                   "(EXTENDSERVE_MAX_BATCH_PHOTOS); split them over several requests")
        return await self.classify_many(photos, top_k, min_score, gone, "classify_batch")

    async def scores(self, photos: list[Any], gone: Callable[[], Awaitable[bool]] | None = None,
                     pixels: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Photos -> their score rows (their pixels appended to ``pixels`` if given), a chunk at a
        time: a batch of hundreds takes turns in the decode threads and the model queue with single
        requests, and stops once its client has gone (``gone``)."""
        rows: list[np.ndarray] = []
        for start in range(0, len(photos), S.chunk):
            if start and gone is not None and await gone():
                log.info("extendserve: the client went away; stopped its batch after %d of %d photos", start, len(photos))
                raise ClientError(499, "the client went away")
            chunk = photos[start : start + S.chunk]
            done = await asyncio.gather(*[self.decode(p, f"image {start + i}" if len(photos) > 1 else "image")
                                          for i, p in enumerate(chunk)])
            if pixels is not None:
                pixels += done
            rows += await asyncio.gather(*[self.batcher.submit(x) for x in done])
        return rows

    @bentoml.api
    @answers_client_errors
    async def classify(self, image: Path, top_k: TopK = 5, min_score: MinScore | None = None) -> Classification:
        """One photo (multipart field ``image``, or the body) -> its top-k labels, scores and heads
        ('unknown' first, one of the k, when the best score is under ``min_score``, default the model's)."""
        return (await self.classify_many([image], top_k, min_score))[0]

    @bentoml.api
    @answers_client_errors
    async def classify_batch(self, images: list[Path], ctx: bentoml.Context, top_k: TopK = 5,
                             min_score: MinScore | None = None) -> list[Classification]:
        """Several photos (multipart field ``images``, repeated) -> one result each, in order."""
        return await self.classify_batch_of(images, top_k, min_score, ctx.request.is_disconnected)


bound_bentoml_metrics()  # series by route, not by the raw path (a client's random URLs cost nothing)
with_description(Classifier, Path(__file__).with_name("README.md"))  # the Swagger page says what this is
Classifier.add_asgi_middleware(HttpEdge, limit=S.max_upload + 64 * 1024, batch_limit=REQUEST_LIMIT,
                               min_rate=S.min_rate, grace=S.grace, admitted=S.admitted,
                               max_parts=S.max_batch_photos + 1, budget=BUDGET)
