"""A built model's manifest: what ``manifest.json`` holds, read and checked in one place.

The runtime, the store, the service and the command line all read it through :class:`Manifest`, so
a key is spelled once and a bad file is refused where it is read, with the fix. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import PreprocessConfig
from ..errors import ExtendserveError
from ..files import FileReadError, TooComplexError, check_plain, read_regular_file

FORMAT = "extendserve-model"
MAX_MANIFEST_BYTES = 64 * 2**20  # a 10,000-class model's manifest is about 1 MB
MODEL_FILES = ("model.onnx", "manifest.json")  # what serving reads
CPU_PRECISIONS = ("f32", "bf16")  # what OpenVINO may serve a model in on the CPU (build --cpu-precision)
HEADS_DIR = "heads"  # the new heads' own files, so a model is rebuilt (a head added or dropped) from itself
BASE_HEAD_NAMES = ("imagenet", "base")  # the base's own block of outputs: a built-in backbone, a foreign base


@dataclass(frozen=True)
class HeadEntry:
    """One block of outputs: the base's own (first) or a new head's, with where it came from."""

    name: str
    offset: int
    count: int
    source: str | None = None
    digest: str | None = None
    method: str = "original"
    classes: list[str] | None = None
    settings: dict[str, Any] | None = None
    background: str | None = None
    background_taken: float | None = None
    heldout: dict[str, Any] | None = None
    file: str | None = None  # the head's file inside the model folder (relative), e.g. heads/celebs.pt
    checks: dict[str, Any] | None = None  # what train-head measured the head will do (strangers_named, the trade)
    trained_on: list[str] | None = None  # digests of its training photos' content (eval: optimistic figures)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.name in BASE_HEAD_NAMES and self.offset == 0:  # the base's entry: as it has always been written
            d = {k: d[k] for k in ("name", "offset", "count", "source", "digest", "method")}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadEntry:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known} | {"name": str(d["name"]), "offset": int(d["offset"]),
                                                                   "count": int(d["count"]),
                                                                   "method": str(d.get("method", "original"))})


@dataclass(frozen=True)
class Manifest:
    """The model's labels, heads, base, preprocessing, verification and the sha256 of its ONNX bytes."""

    labels: list[str]
    heads: list[HeadEntry]
    backbone: dict[str, Any]
    preprocess: PreprocessConfig
    model_sha256: str
    verification: dict[str, Any]
    input: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    opset: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    built: dict[str, Any] = field(default_factory=dict)
    cpu_precision: str = "f32"  # "bf16": OpenVINO may serve in bf16 (asked for at build, changes reported there)
    min_score: float | None = None  # below it the best answer is 'unknown' (build --min-score)

    @property
    def base_count(self) -> int:
        """How many outputs are the base's own (they come first)."""
        return self.heads[0].count

    @property
    def new_heads(self) -> list[HeadEntry]:
        return self.heads[1:]

    def describe(self) -> str:
        """In a few words, for "replaced X -> Y" lines."""
        heads = ", ".join(f"{h.name} ({h.count})" for h in self.heads)
        return f"heads {heads}, sha256 {self.model_sha256[:12]}"

    def summary(self) -> dict[str, Any]:
        """What ``/info`` shows, as the store's metadata (plain JSON values)."""
        return {
            "labels": len(self.labels),
            "heads": [{"name": h.name, "offset": h.offset, "count": h.count, "method": h.method} for h in self.heads],
            "backbone": {k: self.backbone.get(k) for k in ("name", "digest", "source", "layout")},
            "preprocess": self.preprocess.to_dict(),
            "verification": {k: v for k, v in self.verification.items() if isinstance(v, (int, float, bool, str))},
            "model_sha256": self.model_sha256,
            "cpu_precision": self.cpu_precision,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "labels": self.labels, "heads": [h.to_dict() for h in self.heads],
                "backbone": self.backbone, "preprocess": self.preprocess.to_dict(), "input": self.input,
                "output": self.output, "opset": self.opset, "verification": self.verification,
                "model_sha256": self.model_sha256, "settings": self.settings, "built": self.built,
                "cpu_precision": self.cpu_precision, "min_score": self.min_score}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2).encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest.json") -> Manifest:
        """Checked as it is read: the keys a model needs, and heads that tile the labels exactly."""
        try:
            m = cls(labels=[str(x) for x in d["labels"]], heads=[HeadEntry.from_dict(h) for h in d["heads"]],
                    backbone=dict(d.get("backbone") or {}), preprocess=PreprocessConfig.from_dict(d["preprocess"]),
                    model_sha256=str(d["model_sha256"]), verification=dict(d.get("verification") or {}),
                    input=dict(d.get("input") or {}), output=dict(d.get("output") or {}), opset=d.get("opset"),
                    settings=dict(d.get("settings") or {}), built=dict(d.get("built") or {}),
                    cpu_precision=str(d.get("cpu_precision", "f32")),
                    min_score=None if d.get("min_score") is None else float(d["min_score"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ExtendserveError(f"{where}: unreadable manifest ({type(e).__name__}: {e}); rebuild the model") from None
        at = 0
        for h in sorted(m.heads, key=lambda h: h.offset):
            if h.offset != at or h.count < 1:
                raise ExtendserveError(f"{where}: head {h.name!r} does not start where the previous one ends "
                                       f"(offset {h.offset}, expected {at}); rebuild the model")
            at += h.count
        if m.cpu_precision not in CPU_PRECISIONS:
            raise ExtendserveError(f"{where}: cpu_precision {m.cpu_precision!r} is not f32 or bf16; rebuild the model")
        if at != len(m.labels) or not m.heads:
            raise ExtendserveError(f"{where}: the heads cover {at} outputs but there are {len(m.labels)} labels; "
                                   "rebuild the model")
        return m

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        p = Path(path)
        try:
            data = read_regular_file(p, MAX_MANIFEST_BYTES, "manifest")
        except FileReadError as e:
            raise ExtendserveError(f"{e}; rebuild the model") from None
        return cls.from_bytes(data, str(p))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest.json") -> Manifest:
        """A manifest's bytes, bounded: size, nesting and items (an untrusted file)."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ExtendserveError(f"{where}: over the {MAX_MANIFEST_BYTES // 2**20} MB a manifest may be; rebuild the model")
        try:
            d = json.loads(data.decode("utf-8"))
            check_plain(d, where, max_items=2_000_000)
        except (ValueError, RecursionError, TooComplexError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:300]
            raise ExtendserveError(f"{where}: unreadable manifest ({why}); rebuild the model") from None
        if not isinstance(d, dict):
            raise ExtendserveError(f"{where}: not an extendserve manifest; rebuild the model")
        return cls.from_dict(d, where)


def without_paths(value: Any, key: str = "") -> Any:
    """``value`` with every absolute file path cut to its last part: what a manifest records of a
    head's settings and what a served model tells its clients (/info), without the folders of the
    machine that built or serves it (training photos, head files, the store)."""
    if isinstance(value, dict):
        return {k: without_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return value if key in ("labels", "classes") else [without_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def is_manifest(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` says it is an extendserve model's manifest (not whether it is a whole one)."""
    try:
        return json.loads(read_regular_file(path, MAX_MANIFEST_BYTES, "manifest")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError, ExtendserveError):
        return False


def read_model_dir(directory: str | os.PathLike[str]) -> tuple[Manifest, bytes]:
    """A model folder's manifest and ``model.onnx`` bytes, checked against each other: the
    model's sha256 is the one the manifest records (the manifest checks itself as it is read)."""
    d = Path(directory)
    manifest_path, model_path = d / "manifest.json", d / "model.onnx"
    if not manifest_path.is_file() or not model_path.is_file():
        raise ExtendserveError(
            f"{d}: not a built model (expected model.onnx and manifest.json); build one with: "
            f"extendserve build --new-head HEAD.pt -o {d}"
        )
    manifest = Manifest.read(manifest_path)
    data = model_path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if manifest.model_sha256 != got:
        raise ExtendserveError(
            f"{d}: model.onnx is not the model this manifest.json was built with (sha256 "
            f"{got[:12]}, manifest records {manifest.model_sha256[:12]}); the two files come from "
            "different builds or one was changed. Rebuild the model (extendserve build --from "
            f"{manifest_path}) or restore the pair"
        )
    return manifest, data
