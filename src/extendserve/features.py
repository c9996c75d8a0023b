"""Photos -> frozen-backbone features, once: augmented views, cached on disk by file content.

Extraction runs the backbone through onnxruntime (5x faster than torch eager on a 2-core CPU);
the feature graph is exported once per backbone weights and cached beside the features.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .backbone import LoadedBackbone
from .config import PreprocessConfig
from .errors import BadImageError, ExtendserveError
from .preprocess import IMAGE_EXTS, center_crop, decode, is_hidden, resize_shorter

MAX_FILE_BYTES = int(os.environ.get("EXTENDSERVE_MAX_FILE_BYTES", 50 * 1024 * 1024))
# View 0 is exactly what the served model sees; the rest are the training augmentation.
VIEWS = ("center", "center-flip", "tl", "tr", "bl", "br", "tl-flip", "tr-flip", "bl-flip", "br-flip",
         "full", "full-flip")
VIEWS_VERSION = 2  # 2: large JPEGs decoded with draft (see preprocess.decode)


def cache_root() -> Path:
    env = os.environ.get("EXTENDSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "extendserve"


def progress(label: str, done: int, total: int, extra: str = "") -> None:
    """One updating line on a terminal, a line per 10% otherwise (logs stay short)."""
    tty = sys.stderr.isatty()
    if tty or done == total or (total >= 10 and done % max(1, total // 10) == 0):
        end = "\r" if tty and done < total else "\n"
        sys.stderr.write(f"{label}: {done}/{total}{(' ' + extra) if extra else ''}{end}")
        sys.stderr.flush()


@dataclass
class Dataset:
    classes: list[str]
    files: list[Path]
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def scan_folder(root: str | os.PathLike[str]) -> Dataset:
    """A class-per-folder tree: each sub-folder's name is a class, its photos the examples."""
    root = Path(root)
    if not root.is_dir():
        raise ExtendserveError(f"{root}: not a folder; give a folder with one sub-folder of photos per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ExtendserveError(f"{root}: no class folders; put each class's photos in root/<class name>/")
    ds = Dataset(classes, [], [])
    for ci, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if is_hidden(p, root):
                continue
            if p.is_symlink() and not p.exists():
                ds.skipped.append((str(p), "cannot read (a link to nothing)"))
                continue
            if not p.is_file():
                continue
            if p.suffix.lower() not in IMAGE_EXTS:
                ds.skipped.append((str(p), f"not an image file extension ({p.suffix or 'none'})"))
                continue
            size = p.stat().st_size
            if size == 0:
                ds.skipped.append((str(p), "empty file"))
            elif size > MAX_FILE_BYTES:
                ds.skipped.append((str(p), f"{size / 2**20:.0f} MB is over the {MAX_FILE_BYTES / 2**20:.0f} MB limit"))
            else:
                ds.files.append(p)
                ds.labels.append(ci)
    return ds


def views(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The VIEWS of one photo as uint8 [len(VIEWS), crop, crop, 3]."""
    c = cfg.crop
    big = resize_shorter(im, cfg.resize, cfg.interpolation)
    center = center_crop(big, c)
    if big.shape[0] < c or big.shape[1] < c:
        big = center_crop(big, max(c, *big.shape[:2]))
    H, W = big.shape[:2]
    corners = [big[:c, :c], big[:c, W - c :], big[H - c :, :c], big[H - c :, W - c :]]
    full = center_crop(resize_shorter(im, c, cfg.interpolation), c)
    out = [center, center[:, ::-1]] + corners + [x[:, ::-1] for x in corners] + [full, full[:, ::-1]]
    return np.ascontiguousarray(np.stack(out))


def photo_views(data: bytes, source: str, cfg: PreprocessConfig) -> np.ndarray:
    """Photo bytes -> its VIEWS, decoded as the served path decodes (see preprocess.decode)."""
    return views(decode(data, source, cfg.resize), cfg)


class FeatureExtractor:
    """Cached features of the VIEWS of each photo, for one backbone's exact weights."""

    def __init__(self, backbone: LoadedBackbone, cache: Path | None = None):
        self.backbone = backbone
        key = f"{backbone.spec.name}-{backbone.digest[:16]}"
        self.dir = (cache or cache_root()) / "features" / key / f"views-v{VIEWS_VERSION}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._session = None
        self.graph_path = (cache or cache_root()) / "features" / key / "features.onnx"

    def session(self):  # type: ignore[no-untyped-def]
        if self._session is None:
            from .runtime import make_session

            if not self.graph_path.is_file():
                from .export import export_onnx
                from .merge import FeatureModel

                data = export_onnx(FeatureModel(self.backbone), self.backbone.spec.input_size, "features")
                tmp = self.graph_path.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, self.graph_path)
            self._session = make_session(self.graph_path, "cpu")
        return self._session

    def run(self, pixels: np.ndarray, batch: int = 48) -> np.ndarray:
        sess = self.session()
        return np.concatenate(
            [sess.run(["features"], {"pixels": pixels[i : i + batch]})[0] for i in range(0, len(pixels), batch)]
        )

    def extract(
        self, files: Sequence[Path], on_skip: Callable[[str, str], None] | None = None
    ) -> tuple[np.ndarray, list[int], int]:
        """Features [n_ok, len(VIEWS), D] of the readable files, their positions, and cache hits."""
        hits = 0
        pending: list[tuple[int, Path, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            out = self.run(np.concatenate([v for _, _, v in pending]))
            for j, (i, cpath, _) in enumerate(pending):
                f = out[j * len(VIEWS) : (j + 1) * len(VIEWS)].astype(np.float32)
                tmp = cpath.with_suffix(f".tmp-{os.getpid()}.npy")
                np.save(tmp, f)
                os.replace(tmp, cpath)
                results[i] = f
            pending.clear()

        results: dict[int, np.ndarray] = {}
        cfg = self.backbone.spec.preprocess
        for i, path in enumerate(files):
            try:
                data = path.read_bytes()
            except OSError as e:
                if on_skip:
                    on_skip(str(path), f"cannot read ({e.strerror})")
                continue
            cpath = self.dir / f"{hashlib.sha256(data).hexdigest()}.npy"
            if cpath.is_file():
                try:
                    results[i] = np.load(cpath)
                    hits += 1
                    progress("features", i + 1, len(files), f"({hits} cached)")
                    continue
                except (OSError, ValueError):
                    cpath.unlink(missing_ok=True)
            try:
                v = photo_views(data, str(path), cfg)
            except BadImageError as e:
                if on_skip:
                    on_skip(str(path), str(e).split(": ", 1)[-1])
                continue
            pending.append((i, cpath, v))
            if len(pending) >= 4:
                flush()
            progress("features", i + 1, len(files), f"({hits} cached)")
        flush()
        ok = sorted(results)
        feats = [results[i] for i in ok]
        dim = self.backbone.spec.feature_dim
        arr = np.stack(feats) if feats else np.zeros((0, len(VIEWS), dim), np.float32)
        return arr, ok, hits
