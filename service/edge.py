"""The HTTP edge: where requests come in, before BentoML sees them.

Every POST body is read here, whole, before it counts as work: under its size limit (a
Content-Length over it is answered 413 before a byte is read, a chunked body is cut off where it
passes it), at a minimum rate (a body that trickles in is answered 408 and counts for nothing) and
within the worker's memory budget (every byte taken from it before it is held, given back when the
request is answered: 503 with Retry-After past it). Only then is the request admitted, up to a
number of requests in progress per worker (429 past it). BentoML's own concurrency limit sits outside
user middleware and so counted connections that were still uploading: with 300 connections sending
a byte now and then, every other client got 429.

/classify and /classify_batch are answered here, a raw photo body or a multipart form alike, parsed
once (forms.parse_form): BentoML's own path for them read each photo again, spooled it to /tmp and
copied it twice more in its validators (bench/serving/peers.py). The /v2 routes and the pages go on
to BentoML's app with the body already read. No torch here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import bentoml
from starlette.responses import JSONResponse, Response

from extendserve.serving.budget import Held, MemoryBudget, OverBudget
from extendserve.serving.served import give_back_memory

from .forms import CHECK, FORM_FIELDS, parse_form

log = logging.getLogger("extendserve")
T = TypeVar("T")



def error(status: int, message: str, close: bool = False) -> JSONResponse:
    """A client's mistake (or a busy worker's 503): answered with the fix, logged at WARNING in one
    line (no traceback)."""
    log.warning("%d: %s", status, message)
    headers = {"connection": "close"} if close else {}
    if status == 503:
        headers["retry-after"] = "1"
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class ClientError(Exception):
    """Raised where a request is found wrong: answered ``status`` with ``{"error": message}``.

    Not BentoML's ``InvalidArgument``: BentoML 1.4 answers a raised 4xx exception with a JSON *array*
    (``[{"error": ...}]``, bentoml/BentoML#4232, fix open in #5709) and logs it with a traceback at
    ERROR; a client's mistake here is an object and one WARNING line.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> JSONResponse:
        return error(self.status, self.message)


def answers_client_errors(api: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An API method whose :class:`ClientError` becomes its JSON answer (typed as what it returns
    when it succeeds, so BentoML's OpenAPI spec describes the success)."""

    @functools.wraps(api)
    async def answered(*args: Any, **kwargs: Any) -> T:
        try:
            return await api(*args, **kwargs)
        except ClientError as e:
            ctx = kwargs.get("ctx")
            if ctx is not None:  # an API that takes the context: BentoML answers with its status
                ctx.response.status_code = e.status
            return e.response()  # type: ignore[return-value]

    return answered


class _Slow(Exception):
    pass


class _Gone(Exception):
    pass


_DIGITS = re.compile(rb"[0-9]{1,18}")
BODY = "extendserve.body"  # the scope key of a POST body the edge has read
TRIM_AFTER = 8 * 2**20  # after requests that held this much, heap pages go back to the system when the worker is idle


class HttpEdge:
    """ASGI middleware: size, rate, memory and admission limits on request bodies, and /classify
    answered (see the module)."""

    def __init__(self, app: Any, limit: int, batch_limit: int, min_rate: float, grace: float,
                 admitted: int, budget: MemoryBudget, max_parts: int = 257) -> None:
        self.app, self.limit, self.batch_limit = app, limit, batch_limit
        self.min_rate, self.grace = min_rate, grace
        self.slots = asyncio.Semaphore(admitted)
        self.admitted, self.max_parts = admitted, max_parts
        self.budget = budget

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/")
        limit = self.batch_limit if path.endswith("_batch") or path.endswith("/infer") else self.limit
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and _DIGITS.fullmatch(length) and int(length) > limit:
            return await self._too_large(send, int(length), limit)
        try:
            with Held(self.budget) as held:
                await self._answer(scope, receive, send, path, limit, headers, held)
        finally:
            if self.budget.idle_after(TRIM_AFTER):  # the last one out after a large request (or its decoding)
                await asyncio.to_thread(give_back_memory)

    async def _answer(self, scope: Any, receive: Any, send: Any, path: str, limit: int, headers: dict[bytes, bytes],
                      held: Held) -> None:
        try:
            body = await self._read_body(receive, limit, held)
        except _Slow as e:
            return await error(408, str(e), close=True)(scope, receive, send)
        except OverBudget as e:
            return await error(503, e.message, close=True)(scope, receive, send)
        except _Gone:
            return None  # the client went away mid-body: nothing of it goes further
        if body is None:
            return await self._too_large(send, limit + 1, limit)
        ctype_full = headers.get(b"content-type", b"")
        ctype = ctype_full.split(b";")[0].strip().lower()
        # A photo as the body: image/*, octet-stream, or no Content-Type at all (not pydantic's
        # "1 validation error for Input")
        raw = path == "/classify" and (ctype.startswith(b"image/") or ctype in (b"application/octet-stream", b""))
        form = None
        if path in FORM_FIELDS and not raw:
            if ctype != b"multipart/form-data":
                field = "image" if path == "/classify" else "images"
                also = " or the photo as the body (Content-Type: image/jpeg)" if path == "/classify" else ""
                return await error(400, f"{path}: Content-Type {ctype.decode('latin-1')[:60] or 'none'} is not a photo "
                                        f"upload; send multipart/form-data with the field '{field}' (curl -F "
                                        f"{field}=@photo.jpg){also}")(scope, receive, send)
            try:
                form = parse_form(body, ctype_full, path, query_fields(scope), self.max_parts)
            except ValueError as e:
                return await error(400, f"{path}: {e}")(scope, receive, send)
        if self.slots.locked():
            return await error(429, f"{self.admitted} requests are in progress on this worker; retry shortly")(
                scope, receive, send)
        async with self.slots:
            if raw:
                return await self._photos(scope, receive, send, path, [body], query_fields(scope))
            if form is not None:
                return await self._photos(scope, receive, send, path, *form)
            # The body read here, for the /v2 routes to take as it is: Starlette's request.body() joins
            # what it receives with a closing b"", a copy of the whole body (+192 MB for a 192 MB request).
            await self.app(scope | {BODY: body}, _replay(body, receive), send)

    async def _read_body(self, receive: Any, limit: int, held: Held) -> bytes | None:
        """The whole body, or None past ``limit``; each chunk taken from the worker's budget before it
        is kept (past it, the rest is read and dropped, then OverBudget: a client that is refused while
        still sending reads the 503 rather than a reset connection). _Slow when it arrives under the minimum rate (after a grace
        period: the client must have sent (t - grace) * min_rate bytes by time t) or when no byte comes
        for ``grace`` seconds (a client that sent 100 MB at once and then nothing once held its memory
        for hours); _Gone when the client disconnects (its partial body is dropped)."""
        chunks, seen, t0 = [], 0, time.monotonic()
        refused: OverBudget | None = None
        while True:
            now = time.monotonic()
            deadline = t0 + self.grace + (seen / self.min_rate if self.min_rate > 0 else 3600.0)
            deadline = min(deadline, now + self.grace)  # no progress for grace seconds ends it
            try:
                msg = await asyncio.wait_for(receive(), max(0.01, deadline - now))
            except asyncio.TimeoutError:
                if refused is not None:  # refused already: that is the answer
                    raise refused from None
                took = time.monotonic() - t0
                raise _Slow(f"the request body stalled or arrived too slowly ({seen} bytes in {took:.0f} s; "
                            f"at least {self.min_rate / 1024:.0f} KB/s after the first {self.grace:.0f} s and no "
                            f"pause over {self.grace:.0f} s, EXTENDSERVE_UPLOAD_GRACE_S); send it again") from None
            if msg["type"] != "http.request":
                raise _Gone()
            chunk = msg.get("body", b"")
            if chunk:
                seen += len(chunk)
                if refused is None:
                    try:
                        held.take(len(chunk), "this upload")
                        chunks.append(chunk)
                    except OverBudget as e:  # read on without keeping a byte, so the client reads the 503
                        refused, chunks = e, []
                        held.give(held.bytes)
            if seen > limit:
                if refused is not None:
                    raise refused
                return None
            if not msg.get("more_body"):
                break
        if refused is not None:
            raise refused
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _photos(self, scope: Any, receive: Any, send: Any, path: str, photos: list[Any],
                      fields: dict[str, str]) -> None:
        """/classify (one photo: a raw body, curl --data-binary @photo.jpg -H 'Content-Type:
        image/jpeg', what BentoML's multipart-only APIs do not take, bentoml/BentoML#4651, #5215;
        or a form's) and /classify_batch, answered here."""
        try:
            top_k = int(CHECK["top_k"](fields.get("top_k", "5")))
            min_score = float(CHECK["min_score"](fields["min_score"])) if "min_score" in fields else None
        except ValueError as e:
            return await error(400, str(e))(scope, receive, send)
        svc = bentoml.get_current_service()
        try:
            if path == "/classify":
                out: Any = (await svc.classify_many(photos, top_k, min_score))[0].model_dump()
            else:
                out = [c.model_dump() for c in await svc.classify_batch_of(photos, top_k, min_score, _gone(receive))]
            response: Response = JSONResponse(out)
        except ClientError as e:
            response = e.response()
        await response(scope, receive, send)

    @staticmethod
    async def _too_large(send: Any, size: int, limit: int) -> None:
        body = json.dumps({"error": f"the request body ({size / 2**20:.1f} MB so far) is over the "
                                    f"{limit / 2**20:.0f} MB upload limit (EXTENDSERVE_MAX_UPLOAD_MB for /classify, "
                                    "EXTENDSERVE_MAX_REQUEST_MB for /classify_batch); send a smaller photo"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def query_fields(scope: Any) -> dict[str, str]:
    """``?top_k=`` and ``?min_score=`` as sent (the last of each)."""
    from urllib.parse import parse_qs

    got = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return {k: v[-1] for k, v in got.items() if k in CHECK and v}


def _gone(receive: Any) -> Callable[[], Awaitable[bool]]:
    """Whether the client has gone, once its body has been read (the next message is a disconnect)."""
    seen = False

    async def gone() -> bool:
        nonlocal seen
        if not seen:
            try:
                seen = (await asyncio.wait_for(receive(), 0.001))["type"] == "http.disconnect"
            except asyncio.TimeoutError:
                pass
        return seen

    return gone


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
