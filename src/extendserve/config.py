"""Preprocessing settings: plain data, shared by training (torch) and serving (no torch)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GATES = ("mahalanobis", "cosine")  # the gated head's gates, default first (see heads.gated)


def cache_root() -> Path:
    """Where derived files live (features, exported graphs, pinned served models)."""
    env = os.environ.get("EXTENDSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "extendserve"


PIXEL_UNITS = "0-255"
UNIT_SCALE = {"0-1": 255.0, "0-255": 1.0}  # mean/std units -> the factor to pixel units


@dataclass(frozen=True)
class PreprocessConfig:
    """How a photo becomes the model's uint8 input; travels with every model it built.

    ``mean``/``std`` are in 0..255 pixel units and are applied *inside* the exported graph,
    so clients only resize and crop. Written with ``"units": "0-255"`` so nobody reads them as
    torchvision's 0-1 values; ``--preprocess`` takes either, saying which with ``units``.
    """

    resize: int = 256  # shorter side is resized to this
    crop: int = 224  # then a centred square of this size is cut
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    def to_dict(self, units: bool = True) -> dict[str, Any]:
        """``units=False``: the values alone, as features and heads have always been keyed by them."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d | ({"units": PIXEL_UNITS} if units else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        scale = UNIT_SCALE[d.get("units", PIXEL_UNITS)]  # written without units: 0-255, as always
        return cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            interpolation=str(d.get("interpolation", "bilinear")),
            mean=tuple(float(v) * scale for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) * scale for v in d["std"]),  # type: ignore[arg-type]
        )


FEATURES = "extendserve/features"  # the pooled features' tensor in a base graph and every merged model (bases.base)
