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
import math
import os
import re
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
from extendserve.served import check_device, served_model_dir
from extendserve.store import DEFAULT_TAG, packed_tag
from extendserve.store import resolve as resolve_tag

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
THREADS = max(1, CORES // WORKERS)  # the workers split the cores rather than oversubscribe them
UI_PAGE = Path(__file__).with_name("ui.html")

# Which model: EXTENDSERVE_MODEL names a tag in BentoML's model store (default the demo's); for
# development EXTENDSERVE_MODEL_DIR names a folder instead. The main process resolves the tag once
# (``latest`` becomes a version) and its workers inherit the concrete tag, so a model saved later
# under the same name is not served by a worker that restarts.
MODEL_TAG: str | None = None
try:
    if os.environ.get("EXTENDSERVE_MODEL_DIR"):
        MODEL_SOURCE = Path(os.environ["EXTENDSERVE_MODEL_DIR"])
    else:
        wanted = os.environ.get("EXTENDSERVE_MODEL") or packed_tag(__file__) or DEFAULT_TAG
        MODEL_TAG, MODEL_SOURCE = resolve_tag(wanted)
        os.environ["EXTENDSERVE_MODEL"] = MODEL_TAG
    MODEL_DIR = served_model_dir(MODEL_SOURCE)  # checked and pinned once, in the main process
    if os.environ.get("EXTENDSERVE_DEVICE_CHECKED") != str(MODEL_DIR):
        check_device(MODEL_DIR, DEVICE)
        os.environ["EXTENDSERVE_DEVICE_CHECKED"] = str(MODEL_DIR)  # the workers inherit it: checked once
except (ExtendserveError, OSError) as e:
    _stop(str(e))


class HttpEdge:
    """Where requests come in, before BentoML parses them: a body over its limit is refused while it
    streams in (a Content-Length over it is answered 413 before a byte is read, a chunked body is
    cut off where it passes it), and a raw image body to /classify is answered here."""

    def __init__(self, app: Any, limit: int, batch_limit: int) -> None:
        self.app, self.limit, self.batch_limit = app, limit, batch_limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        limit = self.batch_limit if scope.get("path", "").rstrip("/").endswith("_batch") else self.limit
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(send, int(length), limit)
        seen, over, started = 0, False, False

        async def counted() -> Any:
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded(msg: Any) -> None:
            nonlocal started
            if over:
                return  # the app's own answer to the cut-off body is replaced by the 413 below
            started = True
            await send(msg)

        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        path = scope.get("path", "").rstrip("/")
        raw = path == "/classify" and (ctype.startswith(b"image/") or ctype == b"application/octet-stream")
        if raw or (ctype == b"multipart/form-data" and path in FORM_FIELDS):
            body = await _read_all(counted)
            if over:
                return await self._refuse(send, seen, limit)
            if raw:
                return await self._raw_image(scope, body, receive, send)
            problem = form_problem(body, headers.get(b"content-type", b""), path)
            if problem:
                return await _error(400, f"{path}: {problem}")(scope, receive, send)
            counted = _replay(body, receive)
        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send, seen, limit)

    async def _raw_image(self, scope: Any, body: bytes, receive: Any, send: Any) -> None:
        """``POST /classify`` with the photo as the whole body (``curl --data-binary @photo.jpg -H
        'Content-Type: image/jpeg'``), ``top_k`` in the query string: what curl users expect and
        BentoML's multipart-only APIs do not take (bentoml/BentoML#4651, #5215)."""
        from urllib.parse import parse_qs

        raw_k = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("top_k", ["5"])[-1]
        try:
            top_k = int(_strict_int(raw_k))
        except ValueError as e:
            return await _error(400, str(e))(scope, receive, send)
        out = await bentoml.get_current_service().classify_one(body, top_k)
        response = out if isinstance(out, Response) else JSONResponse(out.model_dump())
        await response(scope, receive, send)

    @staticmethod
    async def _refuse(send: Any, size: int, limit: int) -> None:
        body = json.dumps({"error": f"the request body ({size / 2**20:.1f} MB so far) is over the "
                                    f"{limit / 2**20:.0f} MB upload limit; send a smaller photo"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# What each endpoint's multipart form may hold: field -> must it be a file.
FORM_FIELDS = {"/classify": {"image": True, "top_k": False}, "/classify_batch": {"images": True, "top_k": False}}


def form_problem(body: bytes, content_type: bytes, path: str) -> str | None:
    """What is wrong with a multipart form, said so the sender can fix it; None if it is well formed.

    Checked before BentoML parses it: a wrong or unknown field name, or binary data in a text
    field, once made BentoML answer 500 (a UnicodeDecodeError); the likeliest curl mistake,
    ``-F file=@photo.jpg``, gets a 400 naming the field expected."""
    fields = FORM_FIELDS[path]
    photo = next(f for f, is_file in fields.items() if is_file)
    hint = f"send the photo as the multipart field '{photo}' (curl -F {photo}=@photo.jpg)"
    m = re.search(rb'boundary="?([^";]+)"?', content_type)
    if not m:
        return f"the multipart body has no boundary; {hint}"
    seen: list[str] = []
    for part in body.split(b"--" + m.group(1))[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        head, sep, value = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        disposition = next((ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-disposition")), b"")
        name = re.search(rb'name="([^"]*)"', disposition)
        if not sep or not name:
            return f"a part of the multipart body has no field name; {hint}"
        field = name.group(1).decode("utf-8", "replace")
        if field not in fields:
            return f"unknown field {field!r}; {hint}"
        if not fields[field]:
            text = value[:-2] if value.endswith(b"\r\n") else value
            try:
                _strict_int(text.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return f"{field} must be a whole number written in digits, such as 5"
        elif field in seen and path == "/classify":
            return f"more than one '{photo}' field; /classify takes one photo, /classify_batch several ('images')"
        seen.append(field)
    if photo not in seen:
        return f"no '{photo}' field; {hint}"
    return None


async def _read_all(receive: Any) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A receive() that hands the already-read body to the app, then waits as the original does."""
    sent = False

    async def again() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _strict_int(value: Any) -> Any:
    """``top_k`` as digits only: '1e3', '5.0' and 'true' are refused, not read as 1000, 5, 1."""
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.strip().isdigit())
    if not ok:  # BentoML reads form fields as JSON first: '1e3' arrives as 1000.0, 'true' as True
        raise ValueError(f"top_k must be a whole number written in digits, such as 5, not {value!r}")
    return value


TopK = Annotated[int, BeforeValidator(_strict_int)]


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
    model_dir: str
    pinned_copy: str
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


def _error(status: int, message: str) -> JSONResponse:
    """A client's mistake: answered with the fix, logged at WARNING in one line (no traceback)."""
    log.warning("%d: %s", status, message)
    return JSONResponse({"error": message}, status_code=status)


@bentoml.asgi_app(pages, path="/")
@bentoml.service(name="extendserve-classifier", traffic={"timeout": 60, "max_concurrency": 256}, workers=WORKERS)
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

    async def _prepare(self, photo: Path | bytes, name: str) -> np.ndarray:
        """An uploaded file or a raw body -> the model's pixels, size-checked before it is read."""
        size = len(photo) if isinstance(photo, bytes) else photo.stat().st_size
        if size > MAX_UPLOAD:
            raise _TooLarge(f"{name}: {size / 2**20:.1f} MB is over the {MAX_UPLOAD / 2**20:.0f} MB upload limit")
        read = (lambda: photo) if isinstance(photo, bytes) else photo.read_bytes
        return await asyncio.to_thread(lambda: self.model.prepare(read(), name))

    async def classify_one(self, photo: Path | bytes, top_k: int) -> Classification | JSONResponse:
        out = await self._classify([photo], top_k)
        return out if isinstance(out, JSONResponse) else out[0]

    async def _classify(self, paths: list[Path | bytes], top_k: int) -> list[Classification] | JSONResponse:
        if not 1 <= top_k <= len(self.model.labels):
            return _error(400, f"top_k must be between 1 and {len(self.model.labels)}, not {top_k}")
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
            return _error(413, str(e))
        except BadImageError as e:
            return _error(400, str(e))
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
            return _error(400, "no photos: send one or more multipart fields named 'images'")  # type: ignore[return-value]
        if len(images) > MAX_BATCH_PHOTOS:
            return _error(413, f"{len(images)} photos in one request is over the limit of {MAX_BATCH_PHOTOS} "  # type: ignore[return-value]
                               "(EXTENDSERVE_MAX_BATCH_PHOTOS); split them over several requests")
        return await self._classify(images, top_k)  # type: ignore[return-value]


Classifier.add_asgi_middleware(HttpEdge, limit=MAX_UPLOAD + 64 * 1024, batch_limit=MAX_BODY_BATCH)


class _TooLarge(Exception):
    pass
