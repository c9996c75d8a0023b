"""ImageNet-1k class names in the standard order (no torch: the serving path reads them too)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def _rows() -> tuple[tuple[str, str], ...]:
    text = resources.files("extendserve").joinpath("data/imagenet_classes.tsv").read_text("utf-8")
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            synset, name, _lemmas = line.split("\t")
            rows.append((synset, name))
    assert len(rows) == 1000, "imagenet_classes.tsv must list 1000 classes"
    return tuple(rows)


def imagenet_labels() -> list[str]:
    """Short names ("goldfish"), index = class index."""
    return [name for _, name in _rows()]


def imagenet_synsets() -> list[str]:
    """WordNet ids in sorted order: class index = position of the synset."""
    return [synset for synset, _ in _rows()]


def synset_index(synset: str) -> int:
    """Class index of a synset such as ``n01440764`` (0)."""
    idx = {s: i for i, s in enumerate(imagenet_synsets())}
    if synset not in idx:
        raise KeyError(f"{synset!r} is not one of the 1000 ImageNet-1k synsets")
    return idx[synset]
