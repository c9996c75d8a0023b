"""The HTTP edge: where requests come in, before BentoML sees them.

Every POST body is read here, whole, before it counts as work: under its size limit (a
Content-Length over it is answered 413 before a byte is read, a chunked body is cut off where it
passes it) and at a minimum rate (a body that trickles in is answered 408 and counts for nothing).
Only then is the request admitted, up to a number of requests in progress per worker (429 past
it). BentoML's own concurrency limit sits outside user middleware and so counted connections that
were still uploading: with 300 connections sending a byte now and then, every other client got 429.
A raw image body to /classify is answered here, and a malformed multipart form gets a 400 that
names the field expected. No torch here.
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

log = logging.getLogger("extendserve")
T = TypeVar("T")

# What each endpoint's multipart form may hold: field -> must it be a file.
FORM_FIELDS = {"/classify": {"image": True, "top_k": False}, "/classify_batch": {"images": True, "top_k": False}}
MAX_BOUNDARY = 70  # RFC 2046: a multipart boundary is 1 to 70 characters


def error(status: int, message: str, close: bool = False) -> JSONResponse:
    """A client's mistake: answered with the fix, logged at WARNING in one line (no traceback)."""
    log.warning("%d: %s", status, message)
    return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)


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


class _Busy(Exception):
    pass


class _Gone(Exception):
    pass


class HttpEdge:
    """ASGI middleware: size, rate and admission limits on request bodies (see the module)."""

    def __init__(self, app: Any, limit: int, batch_limit: int, min_rate: float, grace: float,
                 admitted: int, max_parts: int = 257, buffered: int = 384 * 2**20) -> None:
        self.app, self.limit, self.batch_limit = app, limit, batch_limit
        self.min_rate, self.grace = min_rate, grace
        self.slots = asyncio.Semaphore(admitted)
        self.admitted, self.max_parts = admitted, max_parts
        self.budget, self.held = buffered, 0  # bytes of bodies still arriving, all uploads of this worker together

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/")
        limit = self.batch_limit if path.endswith("_batch") or path.endswith("/infer") else self.limit
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(send, int(length), limit)
        try:
            body = await self._read_body(receive, limit)
        except _Slow as e:
            return await error(408, str(e), close=True)(scope, receive, send)
        except _Busy as e:
            return await error(503, str(e), close=True)(scope, receive, send)
        except _Gone:
            return None  # the client went away mid-body: nothing of it goes further
        if body is None:
            return await self._too_large(send, limit + 1, limit)
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        # A photo as the body: image/*, octet-stream, or no Content-Type at all (not pydantic's
        # "1 validation error for Input")
        raw = path == "/classify" and (ctype.startswith(b"image/") or ctype in (b"application/octet-stream", b""))
        if path in FORM_FIELDS and not raw and ctype != b"multipart/form-data":
            field = "image" if path == "/classify" else "images"
            also = " or the photo as the body (Content-Type: image/jpeg)" if path == "/classify" else ""
            return await error(400, f"{path}: Content-Type {ctype.decode('latin-1') or 'none'} is not a photo upload; "
                                    f"send multipart/form-data with the field '{field}' (curl -F {field}=@photo.jpg)"
                                    f"{also}")(scope, receive, send)
        if ctype == b"multipart/form-data" and path in FORM_FIELDS:
            ctype_full = headers.get(b"content-type", b"")
            try:
                body = canonical_form(body, ctype_full, path, query_top_k(scope), self.max_parts)
            except ValueError as e:
                return await error(400, f"{path}: {e}")(scope, receive, send)
            hs = [(n, v) for n, v in scope.get("headers") or [] if n.lower() not in (b"content-length", b"content-type")]
            scope = scope | {"headers": hs + [(b"content-length", str(len(body)).encode()),
                                              (b"content-type", b"multipart/form-data; boundary=" + boundary_of(ctype_full))]}
        if self.slots.locked():
            return await error(429, f"{self.admitted} requests are in progress on this worker; retry shortly")(
                scope, receive, send)
        async with self.slots:
            if raw:
                return await self._raw_image(scope, body, receive, send)
            await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Any, limit: int) -> bytes | None:
        """The whole body, or None past ``limit``. _Slow when it arrives under the minimum rate (after
        a grace period: the client must have sent (t - grace) * min_rate bytes by time t) or when no
        byte comes for ``grace`` seconds (a client that sent 100 MB at once and then nothing once held
        its memory for hours); _Busy when this worker already holds its budget of bytes of bodies
        still arriving; _Gone when the client disconnects (its partial body is dropped)."""
        chunks, seen, t0 = [], 0, time.monotonic()
        try:
            while True:
                now = time.monotonic()
                deadline = t0 + self.grace + (seen / self.min_rate if self.min_rate > 0 else 3600.0)
                deadline = min(deadline, now + self.grace)  # no progress for grace seconds ends it
                try:
                    msg = await asyncio.wait_for(receive(), max(0.01, deadline - now))
                except asyncio.TimeoutError:
                    took = time.monotonic() - t0
                    raise _Slow(f"the request body stalled or arrived too slowly ({seen} bytes in {took:.0f} s; "
                                f"at least {self.min_rate / 1024:.0f} KB/s after the first {self.grace:.0f} s and no "
                                f"pause over {self.grace:.0f} s, EXTENDSERVE_UPLOAD_GRACE_S); send it again") from None
                if msg["type"] != "http.request":
                    raise _Gone()
                chunk = msg.get("body", b"")
                if chunk:
                    if self.held + len(chunk) > self.budget:
                        raise _Busy(f"this worker holds {self.held / 2**20:.0f} MB of uploads still arriving, its "
                                    f"limit (EXTENDSERVE_MAX_BUFFERED_MB); retry shortly")
                    self.held += len(chunk)
                    chunks.append(chunk)
                    seen += len(chunk)
                if seen > limit:
                    return None
                if not msg.get("more_body"):
                    break
            return b"".join(chunks)
        finally:
            self.held -= seen


    async def _raw_image(self, scope: Any, body: bytes, receive: Any, send: Any) -> None:
        """``POST /classify`` with the photo as the whole body (``curl --data-binary @photo.jpg -H
        'Content-Type: image/jpeg'``), ``top_k`` in the query string: what curl users expect and
        BentoML's multipart-only APIs do not take (bentoml/BentoML#4651, #5215)."""
        try:
            top_k = int(strict_int(query_top_k(scope) or "5"))
        except ValueError as e:
            return await error(400, str(e))(scope, receive, send)
        try:
            out = await bentoml.get_current_service().classify_one(body, top_k)
            response: Response = JSONResponse(out.model_dump())
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


_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PARAM = re.compile(rb';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\\r\n]|\\.)*"|[^;\s]*)')
PART_HEADERS = (b"content-disposition", b"content-type")
MAX_PART_HEAD = 8 * 1024  # bytes of headers a part may carry


class FormError(ValueError):
    """A multipart form the edge refuses (answered 400 with this message)."""


def params(value: bytes) -> dict[bytes, bytes]:
    """A header's ``; name=value`` parameters, names lower-cased (``BOUNDARY=`` is ``boundary=``)."""
    out: dict[bytes, bytes] = {}
    for name, raw in _PARAM.findall(b";" + value.split(b";", 1)[1] if b";" in value else b""):
        out[name.lower()] = raw[1:-1].replace(b'\\"', b'"') if raw.startswith(b'"') else raw
    return out


def boundary_of(content_type: bytes) -> bytes | None:
    """A multipart Content-Type's boundary, or None."""
    return params(content_type).get(b"boundary") or None


def canonical_form(body: bytes, content_type: bytes, path: str, query_k: str | None, max_parts: int) -> bytes:
    """A multipart form, parsed strictly and written out again in one plain shape for BentoML.

    The edge and BentoML must not disagree about what a body holds: a folded or bogus header
    line, two Content-Types, bytes after a boundary, a missing closing boundary, a text value
    in the photo field (which BentoML once took for a URL to download) or more parts than the
    limit are refused here with what to fix; what passes is rebuilt, so BentoML only ever parses
    forms of one shape: each photo a file part, ``top_k`` once, digits only (the URL's ``?top_k=``
    merged in, and refused when it disagrees with the form's)."""
    fields = FORM_FIELDS[path]
    photo = next(f for f, is_file in fields.items() if is_file)
    hint = f"send the photo as the multipart field '{photo}' (curl -F {photo}=@photo.jpg)"
    boundary = boundary_of(content_type)
    if not boundary:
        raise FormError(f"the multipart Content-Type has no boundary parameter; {hint}")
    if len(boundary) > MAX_BOUNDARY:
        raise FormError(f"the multipart boundary is {len(boundary)} characters long, over the {MAX_BOUNDARY} that "
                        f"RFC 2046 allows; {hint}")
    delim = b"--" + boundary
    at = 0 if body.startswith(delim) else body.find(b"\r\n" + delim)
    if at < 0:
        raise FormError(f"the body holds no '--{boundary.decode('latin-1')}' boundary line; {hint}")
    at += 0 if body.startswith(delim) else 2
    photos: list[tuple[str, bytes]] = []
    top_k: str | None = None
    parts = 0
    while True:
        at += len(delim)
        if body.startswith(b"--", at):  # the closing boundary: only padding and line ends may follow
            if body[at + 2 :].strip(b" \t\r\n"):
                raise FormError("bytes after the closing boundary; end the form with its closing boundary")
            break
        line_end = body.find(b"\r\n", at)
        if line_end < 0 or body[at:line_end].strip(b" \t"):
            raise FormError("bytes after a boundary on its line; each boundary line ends right after the boundary")
        parts += 1
        if parts > max_parts:
            raise FormError(f"over {max_parts} parts in one form (EXTENDSERVE_MAX_BATCH_PHOTOS); split the photos "
                            "over several requests")
        head_end = body.find(b"\r\n\r\n", line_end)
        if head_end < 0 or head_end - line_end > MAX_PART_HEAD:
            raise FormError("a part's headers do not end in a blank line; send the form with curl -F or a "
                            "multipart library")
        headers = _part_headers(body[line_end + 2 : head_end])
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        if nxt < 0:
            raise FormError("the multipart body has no closing boundary; it may have been cut off, send it again")
        value = body[head_end + 4 : nxt]
        at = nxt + 2
        disp = headers.get(b"content-disposition", b"")
        if disp.split(b";")[0].strip().lower() != b"form-data" or b"name" not in params(disp):
            raise FormError(f"a part has no 'Content-Disposition: form-data; name=...' header; {hint}")
        p = params(disp)
        field = p[b"name"].decode("utf-8", "replace")
        if field not in fields:
            raise FormError(f"unknown field {field[:40]!r}: this endpoint takes "
                            + " and ".join(f"'{f}'" for f in fields) + f"; {hint}")
        if fields[field]:
            if b"filename" not in p:
                raise FormError(f"the field '{field}' holds text, not a file; send the photo as a file "
                                f"(curl -F {field}=@photo.jpg: the @ sends the file)")
            if field in [f for f, _ in photos] and path == "/classify":
                raise FormError(f"more than one '{photo}' field; /classify takes one photo, /classify_batch "
                                "several ('images')")
            photos.append((field, value))
        else:
            if b"filename" in p:
                raise FormError(f"'{field}' is a number, not a file; send it as -F {field}=5")
            if top_k is not None:
                raise FormError(f"'{field}' is given more than once; give it once")
            try:
                top_k = strict_int(value.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise FormError(f"{field} must be a whole number written in digits, such as 5") from None
    if not photos:
        raise FormError(f"no '{photo}' field; {hint}")
    if query_k is not None:
        strict_int(query_k)
        if top_k is not None and top_k.strip() != query_k.strip():
            raise FormError(f"top_k is {query_k!r} in the URL and {top_k!r} in the form; give it once")
        top_k = query_k
    out = []
    for i, (field, value) in enumerate(photos):
        out.append(delim + f'\r\nContent-Disposition: form-data; name="{field}"; filename="photo-{i}"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n".encode() + value + b"\r\n")
    if top_k is not None:
        out.append(delim + b'\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n' + top_k.strip().encode() + b"\r\n")
    return b"".join(out) + delim + b"--\r\n"


def _part_headers(block: bytes) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            raise FormError("a folded header line in a part (a line starting with a space); write each header on one line")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise FormError(f"a part's header line {line[:60].decode('latin-1')!r} is not 'Name: value'")
        key = name.lower()
        if key not in PART_HEADERS:
            raise FormError(f"a part carries the header {name[:40].decode('latin-1')!r}; a form part here takes only "
                            "Content-Disposition and Content-Type")
        if key in headers:
            raise FormError(f"a part carries two {name.decode('latin-1')} headers; give each once")
        headers[key] = value.strip()
    return headers


def query_top_k(scope: Any) -> str | None:
    """``?top_k=`` as sent (the last one), or None."""
    from urllib.parse import parse_qs

    got = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True).get("top_k")
    return got[-1] if got else None


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


def strict_int(value: Any) -> Any:
    """``top_k`` as ASCII digits only: '1e3', '5.0', 'true' and '²' are refused, not read as 1000, 5, 1, 2."""
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value.strip()) is not None)
    if not ok:  # BentoML reads form fields as JSON first: '1e3' arrives as 1000.0, 'true' as True
        raise ValueError(f"top_k must be a whole number written in digits, such as 5, not {value!r}")
    return value
