"""The Open Inference Protocol's routes (KServe v2): the service's model behind /v2 (see oip)."""

from __future__ import annotations

import asyncio
from typing import Any

import bentoml
import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from extendserve.serving.budget import OverBudget

from .edge import BODY, ClientError
from .oip import (
    HEADER_LENGTH,
    JSON_TEXT_COPIES,
    JSON_VALUE_BYTES,
    MAX_HEADER,
    InferRequest,
    ProtocolError,
    Wanted,
    check_json_values,
    classification,
    encode_response,
    json_values,
    model_metadata,
    parse_infer,
)


async def run(svc: Any, req: InferRequest) -> list[tuple[Wanted, np.ndarray]]:
    """A request's photos (decoded and checked as /classify's) or pixels -> the outputs it asks for."""
    decoded: list[np.ndarray] = []
    try:
        if req.pixels is None:
            scores = np.stack(await svc.scores(req.photos, pixels=decoded))
        else:
            decoded = list(req.pixels)
            scores = np.stack(await asyncio.gather(*[svc.batcher.submit(x) for x in decoded]))
    except ClientError as e:
        raise ProtocolError(e.status, e.message) from None
    svc.series.answered(scores, np.zeros(len(scores), bool), "v2", None)  # the protocol answers no 'unknown'
    values = {"scores": scores}
    if any(o.name == "logits" for o in req.outputs):
        values["logits"] = await asyncio.to_thread(svc.model.logits, np.stack(decoded))
    return [(o, classification(values[o.name], o.classification, svc.model.labels) if o.classification
             else values[o.name]) for o in req.outputs]


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"retry-after": "1"} if status == 503 else None)


def _model(name: str, version: str | None = None) -> Any:
    """The service if ``name`` (and ``version``, when given) is the model it serves, else a
    ProtocolError: 404 for another model, 400 for a version it does not have (as Triton answers)."""
    svc = bentoml.get_current_service()
    if name != svc.v2_name:
        raise ProtocolError(404, f"no model {name[:80]!r} here; this server serves {svc.v2_name!r} (GET /v2/models/"
                                 f"{svc.v2_name})")
    if version is not None and version != svc.v2_version:
        raise ProtocolError(400, f"no version {version[:40]!r} of model {name[:80]!r}; this server serves version "
                                 f"{svc.v2_version!r} (GET /v2/models/{svc.v2_name})")
    return svc


@router.get("")
async def server_metadata() -> dict[str, Any]:
    from extendserve import __version__

    return {"name": "extendserve", "version": __version__, "extensions": ["classification", "binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict[str, Any]:
    return {"live": True}


@router.get("/health/ready", response_model=None)
async def ready() -> Any:
    ok = bentoml.get_current_service().__is_ready__()
    return {"ready": True} if ok else _error(503, "not ready: the workers are still warming up")


@router.get("/models/{name}", response_model=None)
@router.get("/models/{name}/versions/{version}", response_model=None)
async def metadata(name: str, version: str | None = None) -> Any:
    svc = _model(name, version)
    crop, classes = svc.model.preprocess.crop, len(svc.model.labels)
    return model_metadata(svc.v2_name, svc.v2_version, crop, classes)


@router.get("/models/{name}/ready", response_model=None)
@router.get("/models/{name}/versions/{version}/ready", response_model=None)
async def model_ready(name: str, version: str | None = None) -> Any:
    svc = _model(name, version)
    return {"name": name, "ready": True} if svc.__is_ready__() else _error(503, "not ready: still warming up")


@router.post("/models/{name}/infer", response_model=None)
@router.post("/models/{name}/versions/{version}/infer", response_model=None)
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    """Photos (BYTES ``image``) or pixels (UINT8 ``pixels``) -> ``scores`` and ``logits``."""
    svc = _model(name, version)
    body, length = request.scope.get(BODY) or await request.body(), request.headers.get(HEADER_LENGTH)
    crop, rows = svc.model.preprocess.crop, svc.settings.max_batch_photos
    values = json_values(body, length)  # counted before a byte is parsed, its cost taken from the budget
    check_json_values(values, b'"pixels"' in body[: len(body) if length is None else MAX_HEADER], crop, rows)
    cost = values * JSON_VALUE_BYTES + JSON_TEXT_COPIES * (len(body) if length is None else min(len(body), MAX_HEADER))
    if cost > svc.budget.limit:
        raise ProtocolError(413, f"parsing this request's JSON would hold {cost / 2**20:.0f} MB, over this worker's "
                                 f"memory budget of {svc.budget.limit / 2**20:.0f} MB; send photos and pixels as binary "
                                 "tensor data")
    try:
        svc.budget.take(cost, "this request's JSON")
    except OverBudget as e:
        raise ProtocolError(503, e.message) from None
    try:  # off the event loop: /livez and the other requests go on meanwhile
        req = await asyncio.to_thread(parse_infer, body, length, crop, len(svc.model.labels), rows)
    finally:
        svc.budget.give(cost)
    tensors = await run(svc, req)
    data, headers = encode_response(svc.v2_name, svc.v2_version, req.id, tensors)
    return Response(data, headers=headers)


def attach(app: Any) -> None:
    """The protocol's routes on ``app``, a ProtocolError raised anywhere in them answered as the
    protocol says: its status and ``{"error": message}``."""
    app.include_router(router)

    async def answer(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, ProtocolError)
        return _error(e.status, e.message)

    app.add_exception_handler(ProtocolError, answer)
