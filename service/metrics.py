"""The outermost hook: BentoML's HTTP series labelled by route, never by the raw path, and a
Content-Type no middleware behind it can read refused before they try.

BentoML's traffic middleware labels every request with ``scope["path"]`` as sent, so each distinct
URL made new series in every worker's multiprocess files: 20,000 GETs of random paths took a worker
from 608 to 1404 MB, ``/metrics`` to 94 MB and 57 s, and filled a pod's memory-backed /tmp. Here the
same middleware sees the route a request matches (``/v2/models/{name}/infer``) or ``other``, and the
app behind it the path as sent. No torch here.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("extendserve")

ROUTES = {"/", "/classify", "/classify_batch", "/info", "/ui", "/docs", "/docs.json", "/schema.json", "/healthz",
          "/livez", "/readyz", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready"}
_V2_MODEL = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?(/ready|/infer)?")
OTHER = "other"  # every path no route takes: one label, whatever was sent
ON_SCRAPE: list[Any] = []  # told of each /metrics request before it is answered (service/series.py)
_PATH = "extendserve.path"


def route_of(path: str) -> str:
    """The route ``path`` matches, as a bounded label."""
    p = path.rstrip("/") or "/"
    if p in ROUTES:
        return p
    m = _V2_MODEL.fullmatch(p)
    if m:
        return "/v2/models/{name}" + ("/versions/{version}" if m.group(1) else "") + (m.group(2) or "")
    if p.startswith("/static_content/") and ".." not in p:
        return "/static_content/{file}"
    return OTHER


def _ascii_content_type(scope: Any) -> bool:
    return all(v.isascii() for k, v in scope.get("headers") or [] if k.lower() == b"content-type")


async def _refuse_content_type(scope: Any, receive: Any, send: Any) -> None:
    """A Content-Type with a byte past ASCII: BentoML's access log and the apps behind it decode it
    as UTF-8 and failed (200 with an empty body, two tracebacks at ERROR). Answered here, outermost,
    before any of them reads it: 400, one WARNING line."""
    from starlette.responses import JSONResponse

    msg = "the Content-Type header holds bytes that are not ASCII; send a plain media type such as image/jpeg"
    log.warning("400: %s", msg)
    await JSONResponse({"error": msg}, status_code=400)(scope, receive, send)


def bound_bentoml_metrics() -> None:
    """Make BentoML's traffic middleware label by :func:`route_of` (called before its app is built)."""
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "by_route", False):
        return

    class ByRoute(base):  # type: ignore[misc, valid-type]
        by_route = True

        def __init__(self, app: Any, **kwargs: Any) -> None:
            async def as_sent(scope: Any, receive: Any, send: Any) -> None:  # the app sees the path as sent
                await app(scope | {"path": scope[_PATH]} if _PATH in scope else scope, receive, send)

            super().__init__(as_sent, **kwargs)

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope.get("type") == "http" and not _ascii_content_type(scope):
                return await _refuse_content_type(scope, receive, send)
            if scope.get("type") in ("http", "websocket"):
                route = route_of(scope.get("path", ""))
                if route == "/metrics":
                    for hook in ON_SCRAPE:
                        hook()
                if route != scope.get("path"):
                    scope = scope | {"path": route, _PATH: scope.get("path", "")}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = ByRoute
