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
            return e.response()  # type: ignore[return-value]

    return answered


class _Slow(Exception):
    pass


class HttpEdge:
    """ASGI middleware: size, rate and admission limits on request bodies (see the module)."""

    def __init__(self, app: Any, limit: int, batch_limit: int, min_rate: float, grace: float,
                 admitted: int) -> None:
        self.app, self.limit, self.batch_limit = app, limit, batch_limit
        self.min_rate, self.grace = min_rate, grace
        self.slots = asyncio.Semaphore(admitted)
        self.admitted = admitted

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/")
        limit = self.batch_limit if path.endswith("_batch") else self.limit
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(send, int(length), limit)
        try:
            body = await self._read_body(receive, limit)
        except _Slow as e:
            return await error(408, str(e), close=True)(scope, receive, send)
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
            problem = form_problem(body, headers.get(b"content-type", b""), path)
            if problem:
                return await error(400, f"{path}: {problem}")(scope, receive, send)
            try:
                body, scope = query_top_k_into_form(body, headers.get(b"content-type", b""), scope)
            except ValueError as e:
                return await error(400, f"{path}: {e}")(scope, receive, send)
        if self.slots.locked():
            return await error(429, f"{self.admitted} requests are in progress on this worker; retry shortly")(
                scope, receive, send)
        async with self.slots:
            if raw:
                return await self._raw_image(scope, body, receive, send)
            await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Any, limit: int) -> bytes | None:
        """The whole body, or None past ``limit``; _Slow when it arrives under the minimum rate
        (after a grace period): the client must have sent (t - grace) * min_rate bytes by time t."""
        chunks, seen, t0 = [], 0, time.monotonic()
        while True:
            deadline = t0 + self.grace + (seen / self.min_rate if self.min_rate > 0 else 3600.0)
            try:
                msg = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                took = time.monotonic() - t0
                raise _Slow(f"the request body arrived too slowly ({seen} bytes in {took:.0f} s; at least "
                            f"{self.min_rate / 1024:.0f} KB/s after the first {self.grace:.0f} s); send it "
                            "again over a faster connection") from None
            if msg["type"] != "http.request":
                break  # the client went away; the app sees the disconnect when it asks
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return None
            if not msg.get("more_body"):
                break
        return b"".join(chunks)

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
                                    f"{limit / 2**20:.0f} MB upload limit; send a smaller photo"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def form_problem(body: bytes, content_type: bytes, path: str) -> str | None:
    """What is wrong with a multipart form, said so the sender can fix it; None if it is well formed.

    Checked before BentoML parses it: a wrong or unknown field name, binary data in a text field or
    a boundary over RFC 2046's 70 characters once made BentoML answer 500; the likeliest curl
    mistake, ``-F file=@photo.jpg``, gets a 400 naming the field expected."""
    fields = FORM_FIELDS[path]
    photo = next(f for f, is_file in fields.items() if is_file)
    hint = f"send the photo as the multipart field '{photo}' (curl -F {photo}=@photo.jpg)"
    boundary = boundary_of(content_type)
    if not boundary:
        return f"the multipart body has no boundary; {hint}"
    if len(boundary) > MAX_BOUNDARY:
        return (f"the multipart boundary is {len(boundary)} characters long, over the {MAX_BOUNDARY} that "
                f"RFC 2046 allows; {hint}")
    seen: list[str] = []
    for part in body.split(b"--" + boundary)[1:]:
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
                strict_int(text.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return f"{field} must be a whole number written in digits, such as 5"
        elif field in seen and path == "/classify":
            return f"more than one '{photo}' field; /classify takes one photo, /classify_batch several ('images')"
        seen.append(field)
    if photo not in seen:
        return f"no '{photo}' field; {hint}"
    return None


def boundary_of(content_type: bytes) -> bytes | None:
    """A multipart Content-Type's boundary, or None."""
    m = re.search(rb'boundary="?([^";]+)"?', content_type)
    return m.group(1) if m else None


def query_top_k(scope: Any) -> str | None:
    """``?top_k=`` as sent (the last one), or None."""
    from urllib.parse import parse_qs

    got = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True).get("top_k")
    return got[-1] if got else None


def query_top_k_into_form(body: bytes, content_type: bytes, scope: Any) -> tuple[bytes, Any]:
    """A form upload with ``?top_k=`` in the URL (``curl -F image=@x '/classify?top_k=2'``): the
    query's top_k added to the form as its field, which BentoML reads (it ignores the query). Raises
    ValueError for a top_k that is not digits, or one given in both places with other values."""
    k = query_top_k(scope)
    if k is None:
        return body, scope
    strict_int(k)
    boundary = boundary_of(content_type) or b""  # form_problem has refused a form without one
    in_form = re.search(rb'name="top_k"\r\n\r\n([^\r]*)\r\n', body)
    if in_form:
        if in_form.group(1).strip() != k.strip().encode():
            raise ValueError(f"top_k is {k!r} in the URL and {in_form.group(1).decode('latin-1')!r} in the form; give it once")
        return body, scope
    end = body.rfind(b"--" + boundary + b"--")
    if end < 0:
        raise ValueError("the multipart body has no closing boundary; send it with curl -F or a multipart library")
    part = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n' + k.strip().encode() + b"\r\n"
    body = body[:end] + part + body[end:]
    headers = [(n, v) for n, v in scope.get("headers") or [] if n.lower() != b"content-length"]
    return body, scope | {"headers": headers + [(b"content-length", str(len(body)).encode())]}


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
    """``top_k`` as digits only: '1e3', '5.0' and 'true' are refused, not read as 1000, 5, 1."""
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.strip().isdigit())
    if not ok:  # BentoML reads form fields as JSON first: '1e3' arrives as 1000.0, 'true' as True
        raise ValueError(f"top_k must be a whole number written in digits, such as 5, not {value!r}")
    return value
