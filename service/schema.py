"""What the API takes and returns, typed, so the OpenAPI spec (/docs.json) describes it."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from extendserve.runtime import Prediction

from .edge import strict_int

TopK = Annotated[int, BeforeValidator(strict_int)]


class Classification(BaseModel):
    """A photo's top-k classes, best first (``extendserve.runtime.Prediction``, as ``predict`` gives them)."""

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
    engine: dict[str, Any] = Field(description="the engine running the model (onnxruntime or OpenVINO) and why")
    batching: dict[str, float] = Field(description="this worker's micro-batcher: model calls and photos so far, "
                                                    "max_batch, window_ms")
    versions: dict[str, str]
