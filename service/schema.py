"""What the API takes and returns, typed, so the OpenAPI spec (/docs.json) describes it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from extendserve.serving.runtime import Prediction

from .forms import strict_int, strict_share

TopK = Annotated[int, BeforeValidator(strict_int)]
MinScore = Annotated[float, BeforeValidator(strict_share)]


class Classification(BaseModel):
    """A photo's top-k classes, best first (``extendserve.serving.runtime.Prediction``, as ``predict`` gives them)."""

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
    workers: dict[str, Any] = Field(description="workers, threads per worker and the CPUs they follow (the "
                                                "cgroup's CPU quota where there is one)")
    memory: dict[str, Any] = Field(description="this worker's memory budget for requests: budget_bytes, where it came "
                                               "from (budget_from), held_bytes now, peak_bytes, requests refused for it")
    min_score: float | None = Field(None, description="below this best score the first answer is 'unknown' (build "
                                                      "--min-score; a request's min_score overrides it)")
    versions: dict[str, str]


def with_description(svc: Any, readme: Path) -> None:
    """The OpenAPI (Swagger page) description of ``svc``: ``readme``, not BentoML's generic text.
    BentoML takes it only from a bento's description (bentofile.yaml points at the same file);
    served from the source folder, overriding the ``doc`` property is the way (bentoml/BentoML#2975)."""
    text = readme.read_text("utf-8")

    class Documented(type(svc)):  # type: ignore[misc]
        __slots__ = ()

        @property
        def doc(self) -> str:
            return self.bento.doc if self.bento is not None else text

    svc.__class__ = Documented


def info_payload(model: Any, batching: dict[str, float], s: Any, tag: str | None, source: Any,
                 warm: int | None, memory: dict[str, Any]) -> dict[str, Any]:
    """GET /info's body (see :class:`Info`); server paths only where EXTENDSERVE_INFO_PATHS=1."""
    import sys

    import bentoml
    import numpy as np
    import onnxruntime

    from extendserve import __version__
    from extendserve.building.manifest import without_paths
    from extendserve.serving.settings import cgroup_cpus, cores

    m = model.manifest.to_dict()
    payload = {k: m[k] for k in ("labels", "backbone", "preprocess", "verification", "opset", "model_sha256", "min_score")}
    payload["heads"] = [{k: v for k, v in h.items() if k != "trained_on"} | ({"trained_on_photos": len(h["trained_on"])}
                        if h.get("trained_on") else {}) for h in m["heads"]]
    payload |= {
        "model_tag": tag, "model_version": tag.split(":")[1] if tag else None,
        "model_dir": str(source), "pinned_copy": str(model.dir), "device": model.device, "providers": model.providers,
        "batching": batching, "engine": model.engine_report, "memory": memory,
        "workers": {"workers": s.workers, "threads_per_worker": s.threads, "cpus": cores(), "cpu_quota": cgroup_cpus(),
                    "decoding_per_worker": s.decoding, "warm": warm},
        "versions": {"extendserve": __version__, "onnxruntime": onnxruntime.__version__, "bentoml": bentoml.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]},
    }
    return payload if s.show_paths else without_paths(payload | {"model_dir": None, "pinned_copy": None})
