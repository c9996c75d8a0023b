"""What the API takes and returns, typed, so the OpenAPI spec (/docs.json) describes it."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from .edge import strict_int

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
