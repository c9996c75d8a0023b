"""The HTTP service: the merged ONNX model behind BentoML, on the GPU when there is one.

No torch here: onnxruntime, numpy and Pillow only. Decoding runs in worker threads, off the
event loop, and concurrent requests share model calls through a small in-process batcher.
Settings and the model are checked when this module is imported, in ``bentoml serve``'s main
process, so a bad one stops the whole service at once with the fix (see extendserve.served).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
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

from extendserve import __version__
from extendserve.batching import MicroBatcher
from extendserve.errors import BadImageError, ExtendserveError
from extendserve.manifest import without_paths
from extendserve.runtime import Model
from extendserve.served import give_back_memory, resolve_served_model
from extendserve.settings import ServiceSettings, cgroup_cpus, cores

from .edge import ClientError, HttpEdge, answers_client_errors
from .oip import ProtocolError, classification
from .oip import router as v2_router
from .schema import Classification, Info, TopK, with_description

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
try:  # checked in bentoml serve's main process: a bad setting or model stops the whole service
    S = ServiceSettings.from_env()
    MODEL_TAG, MODEL_SOURCE, MODEL_DIR = resolve_served_model(__file__, S.device)
except (ExtendserveError, OSError) as e:
    _stop(str(e))


# The CPU engine is chosen once, here in the main process, and handed to every worker through the
# environment they inherit: two workers measuring for themselves once chose two engines for one
# model (a difference of noise), and one photo's score then depended on the worker that answered.
ENGINE_CHOICE = "EXTENDSERVE_ENGINE_CHOICE"


def _engine_choice() -> dict[str, Any] | None:
    if S.engine != "auto":
        return None
    key = f"{MODEL_DIR}|{S.device}|{S.threads}"
    try:
        got = json.loads(os.environ.get(ENGINE_CHOICE, "null"))
        if isinstance(got, dict) and got.get("for") == key and isinstance(got.get("report"), dict):
            return got["report"]  # a worker: the main process chose
    except ValueError:
        pass
    report = Model(MODEL_DIR, device=S.device, threads=S.threads, engine="auto").engine_report
    report = report | {"chosen": f"once at start, for all {S.workers} worker(s)"}
    os.environ[ENGINE_CHOICE] = json.dumps({"for": key, "report": report})
    return report


# Ready means every worker has warmed up: each leaves a mark named by its pid in a folder the main
# process made (its workers inherit the path); /readyz and /v2/health/ready count the live ones.
READY_ENV = "EXTENDSERVE_READY_DIR"
if READY_ENV not in os.environ:
    try:
        os.environ[READY_ENV] = tempfile.mkdtemp(prefix="extendserve-ready-")
    except OSError:
        os.environ[READY_ENV] = ""  # nowhere to write: a worker that answers is a warm one
READY_DIR = Path(os.environ[READY_ENV]) if os.environ[READY_ENV] else None


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


try:
    ENGINE_REPORT = _engine_choice()
except (ExtendserveError, OSError) as e:
    _stop(str(e))


# A FastAPI app, so that BentoML puts /info and /ui into the service's OpenAPI spec beside its APIs.
pages = FastAPI(title="extendserve pages")


@pages.get("/info", response_model=Info)
async def info() -> dict[str, Any]:
    return bentoml.get_current_service().info_payload()


pages.include_router(v2_router)


@pages.get("/ui", response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
async def ui() -> Response:
    return FileResponse(UI_PAGE, media_type="text/html")


@bentoml.asgi_app(pages, path="/")
@bentoml.service(name="extendserve-classifier", traffic={"timeout": 60}, workers=S.workers)
class Classifier:
    # Declared here, as a class attribute, so that `bentoml build` packs the model by reference.
    if MODEL_TAG is not None:
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
        # INFO, not WARNING: serving on the CPU is a normal state (a failed CUDA load warns where it happens)
        log.setLevel(logging.INFO)
        log.info("extendserve: serving %s (pinned copy %s) on %s with %s (providers: %s)", MODEL_TAG or MODEL_SOURCE,
                    MODEL_DIR, self.model.device.upper(), self.model.engine.name,
                    ", ".join(self.model.providers))
        self.model.warm_up((1, 8, S.max_batch))  # grow memory arenas to the largest batch now
        # An in-process batcher rather than @bentoml.api(batchable=True): a batchable API takes exactly
        # one argument ("Batch inference function only accept one argument", BentoML 1.4's
        # batch_infer), so /classify's top_k and /classify_batch's many photos a request would need a
        # second service and a hop between processes. Measured (bench/http_bench.py, 16 clients, this
        # 2-core CPU): batching concurrent photos within 4 ms served 0.82 of the in-process rate
        # against 0.62 without, with one worker.
        self.batcher = MicroBatcher(self.model.probabilities, max_batch=S.max_batch, max_wait_ms=S.batch_ms)
        # Photos decoded at once on this worker, whatever the number of requests: a decoded 12 MP
        # photo is 36 MB, and six concurrent batches once took a worker from 333 MB to 1 GB for good.
        self.decoding = asyncio.Semaphore(S.decoding)
        self.batches = 0  # batch requests in progress; the last one out gives memory back
        if READY_DIR is not None:
            try:
                (READY_DIR / str(os.getpid())).touch()
            except OSError:
                pass

    def __is_ready__(self) -> bool:
        """Every worker has loaded and warmed up the model (BentoML's /readyz asks this)."""
        if READY_DIR is None:
            return True
        try:
            return sum(_alive(p.name) for p in READY_DIR.iterdir()) >= S.workers
        except OSError:
            return True

    # The Open Inference Protocol's name for this model: its store name (extendserve-default), else
    # the model folder's name; its version: the store version, else the model's sha256 prefix.
    v2_name = MODEL_TAG.split(":")[0] if MODEL_TAG else Path(MODEL_SOURCE).name
    max_batch_photos = S.max_batch_photos

    @property
    def v2_version(self) -> str:
        return MODEL_TAG.split(":")[1] if MODEL_TAG else self.model.manifest.model_sha256[:12]

    async def infer_v2(self, req: Any) -> list[tuple[Any, np.ndarray]]:
        """An Open Inference Protocol request (see oip): the same decoding, limits and batcher as /classify."""
        try:
            if req.pixels is None:
                pixels = []
                for start in range(0, len(req.photos), S.chunk):
                    chunk = req.photos[start : start + S.chunk]
                    pixels += await asyncio.gather(*[self._prepare(p, f"image {start + i}") for i, p in enumerate(chunk)])
            else:
                pixels = list(req.pixels)
        except ClientError as e:
            raise ProtocolError(e.status, e.message) from None
        values = {"scores": np.stack(await asyncio.gather(*[self.batcher.submit(x) for x in pixels]))}
        if any(o.name == "logits" for o in req.outputs):
            values["logits"] = await asyncio.to_thread(self.model.logits, np.stack(pixels))
        return [(o, classification(values[o.name], o.classification, self.model.labels) if o.classification
                 else values[o.name]) for o in req.outputs]

    def info_payload(self) -> dict[str, Any]:
        import onnxruntime

        m = self.model.manifest.to_dict()
        payload = {
            "labels": m["labels"],
            "heads": m["heads"],
            "backbone": m["backbone"],
            "preprocess": m["preprocess"],
            "verification": m["verification"],
            "opset": m["opset"],
            "model_sha256": m["model_sha256"],
            "model_tag": MODEL_TAG,
            "model_version": MODEL_TAG.split(":")[1] if MODEL_TAG else None,
            "model_dir": str(MODEL_SOURCE),
            "pinned_copy": str(self.model.dir),
            "device": self.model.device,
            "providers": self.model.providers,
            "batching": self.batcher.stats(),
            "workers": {"workers": S.workers, "threads_per_worker": S.threads, "cpus": cores(),
                        "cpu_quota": cgroup_cpus(), "decoding_per_worker": S.decoding},
            "engine": self.model.engine_report,
            "versions": {"extendserve": __version__, "onnxruntime": onnxruntime.__version__,
                         "bentoml": bentoml.__version__, "numpy": np.__version__,
                         "python": sys.version.split()[0]},
        }
        # Server paths (training folders, head files, the store) only where a setting asks for them.
        return payload if S.show_paths else without_paths(payload | {"model_dir": None, "pinned_copy": None})

    async def _prepare(self, photo: Path | bytes, name: str) -> np.ndarray:
        """An uploaded file or a raw body -> the model's pixels, size-checked before it is read."""
        size = len(photo) if isinstance(photo, bytes) else photo.stat().st_size
        if size > S.max_upload:
            raise ClientError(413, f"{name}: {size / 2**20:.1f} MB is over the {S.max_upload / 2**20:.0f} MB upload limit")
        read = (lambda: photo) if isinstance(photo, bytes) else photo.read_bytes
        async with self.decoding:
            try:
                return await asyncio.to_thread(lambda: self.model.prepare(read(), name))
            except BadImageError as e:
                raise ClientError(400, str(e)) from None

    async def classify_one(self, photo: Path | bytes, top_k: int) -> Classification:
        return (await self._classify([photo], top_k))[0]

    async def _classify(self, paths: list[Path | bytes], top_k: int,
                        ctx: bentoml.Context | None = None) -> list[Classification]:
        try:
            self.model.check_top_k(top_k)
        except ExtendserveError as e:
            raise ClientError(400, str(e)) from None
        rows: list[np.ndarray] = []
        # A chunk at a time: a batch of hundreds takes turns in the decode threads and the model
        # queue with single requests, rather than queueing all its photos ahead of theirs.
        for start in range(0, len(paths), S.chunk):
            if start and ctx is not None and await ctx.request.is_disconnected():
                log.info("extendserve: the client went away; stopped its batch after %d of %d photos", start, len(paths))
                raise ClientError(499, "the client went away")
            chunk = paths[start : start + S.chunk]
            pixels = await asyncio.gather(*[self._prepare(p, f"image {start + i}" if len(paths) > 1 else "image")
                                            for i, p in enumerate(chunk)])
            rows += await asyncio.gather(*[self.batcher.submit(x) for x in pixels])
        return [Classification(predictions=row) for row in self.model.top_k(np.stack(rows), top_k)]

    @bentoml.api
    @answers_client_errors
    async def classify(self, image: Path, top_k: TopK = 5) -> Classification:
        """One photo (multipart field ``image``) -> its top-k labels, scores and heads."""
        return await self.classify_one(image, top_k)

    @bentoml.api
    @answers_client_errors
    async def classify_batch(self, images: list[Path], ctx: bentoml.Context, top_k: TopK = 5) -> list[Classification]:
        """Several photos (multipart field ``images``, repeated) -> one result each, in order."""
        if not images:
            raise ClientError(400, "no photos: send one or more multipart fields named 'images'")
        if len(images) > S.max_batch_photos:
            raise ClientError(413, f"{len(images)} photos in one request is over the limit of {S.max_batch_photos} "
                                   "(EXTENDSERVE_MAX_BATCH_PHOTOS); split them over several requests")
        self.batches += 1
        try:
            return await self._classify(images, top_k, ctx)
        finally:
            self.batches -= 1
            if not self.batches:
                await asyncio.to_thread(give_back_memory)


with_description(Classifier, Path(__file__).with_name("README.md"))  # the Swagger page says what this is
Classifier.add_asgi_middleware(HttpEdge, limit=S.max_upload + 64 * 1024, batch_limit=S.max_request,
                               min_rate=S.min_rate, grace=S.grace, admitted=S.admitted,
                               max_parts=S.max_batch_photos + 1, buffered=S.max_buffered)
