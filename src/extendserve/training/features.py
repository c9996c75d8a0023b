"""Photos -> frozen-backbone features, once: augmented views, cached on disk by file content.

Extraction runs the base graph up to its features in onnxruntime (5x faster than torch eager on a
2-core CPU for the built-in backbones).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bases.base import PIXELS, Base
from ..config import cache_root
from ..errors import BadImageError, ExtendserveError
from ..files import walk, write_atomic
from ..names import escaped
from ..photos.preprocess import IMAGE_EXTS, MAX_FILE_BYTES, is_hidden, read_photo
from ..photos.views import VIEWS, photo_views
from ..progress import eta, progress

# Views through the base at once: onnxruntime's arena grows to the largest batch and keeps it, and
# at 48 views EfficientNet-Lite0's activations held about 0.7 GB of train-head's 1.7 GB peak.
BATCH = 12
V3_KEPT = (0, 1, 2, 3, 4, 5, 10, 11)  # VIEWS' places among version 3's twelve
VIEWS_VERSION = 4  # 2: large JPEGs decoded with draft; 3: large photos of any format box-reduced first;
# 4: the corners' mirror images dropped (a version 3 entry is read for its other eight views)


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
        if any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir() if p.is_file()):
            raise ExtendserveError(f"{root}: holds photos but no class folders; it looks like one class's folder: give "
                                   f"the folder above it, {root.resolve().parent}, whose sub-folders are the classes")
        raise ExtendserveError(f"{root}: no class folders; put each class's photos in root/<class name>/")
    sets = [c for c in classes if _holds_classes(root / c)]
    if sets and len(sets) == len(classes):
        given = ", ".join(escaped(str(root / c)) for c in sets[:3])
        raise ExtendserveError(
            f"{escaped(str(root))}: its sub-folder{'s' if len(sets) > 1 else ''} {', '.join(repr(c) for c in sets[:3])} "
            f"{'hold' if len(sets) > 1 else 'holds'} folders of photos, not photos: it looks like the folder "
            f"above a set of classes, not a set of classes. Give the folder whose sub-folders are the classes "
            f"({given}); to train one class on several kinds of photo, put a photo directly in its folder")
    seen: dict[Path, str] = {}
    for c in classes:  # a class folder linked to another would be the same photos under two names
        real = (root / c).resolve()
        if real in seen:
            raise ExtendserveError(f"{root}: class folders {seen[real]!r} and {c!r} are the same folder ({real}); "
                                   "remove the link, or give the class its own photos")
        seen[real] = c
    ds = Dataset(classes, [], [])
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            ds.skipped.append((str(p), "a photo beside the class folders belongs to no class; move it into "
                                       "the folder of its class"))
    for ci, c in enumerate(classes):
        for p in walk(root / c):
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


def _holds_classes(folder: Path) -> bool:
    """A folder that looks like a set of classes: two or more sub-folders with photos, and no photo
    of its own (a class of several kinds, ``dogs/poodle``, ``dogs/beagle``, is told apart from
    ``parent/photos``, ``parent/held-out`` by nothing else, so one photo in it says it is a class)."""
    try:
        entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
        if any(e.is_file() and e.suffix.lower() in IMAGE_EXTS for e in entries):
            return False
        with_photos = 0
        for d in (e for e in entries if e.is_dir()):
            if any(x.suffix.lower() in IMAGE_EXTS or x.is_dir() for x in d.iterdir() if not x.name.startswith(".")):
                with_photos += 1
        return with_photos >= 2
    except OSError:
        return False


class FeatureCache:
    """One ``.npz`` per photo and backbone weights, holding its features and what they are for.

    Entries are checked on every read: the right key (photo content, weights, views), shape,
    finite values and the digest of the values themselves. A bad entry is recomputed and
    replaced with one warning; a cache that cannot be written is used read-only, with one warning.
    """

    def __init__(self, directory: Path, key_prefix: str, shape: tuple[int, int]):
        self.dir = directory
        self.prefix = key_prefix
        self.shape = shape
        self.writable = True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._read_only(e)

    def _read_only(self, e: OSError) -> None:
        if self.writable:
            warn(f"feature cache {self.dir} cannot be written ({e.strerror or e}); using it read-only, "
                 "features not in it are computed every run (set EXTENDSERVE_CACHE to a writable folder)")
        self.writable = False

    def key(self, data: bytes) -> str:
        return hashlib.sha256(self.prefix.encode() + hashlib.sha256(data).digest()).hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        path = self.dir / f"{key}.npz"
        if not path.is_file():
            return None
        why = None
        try:
            with np.load(path, allow_pickle=False) as z:
                feats, stored_key, digest = z["features"], str(z["key"]), str(z["digest"])
            if stored_key != key:
                why = "it belongs to another photo or backbone"
            elif feats.shape != self.shape or feats.dtype != np.float32:
                why = f"shape {feats.shape} {feats.dtype}, expected {self.shape} float32"
            elif not np.isfinite(feats).all():
                why = "it holds NaN or infinite values"
            elif hashlib.sha256(feats.tobytes()).hexdigest() != digest:
                why = "its values do not match their digest"
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            why = f"unreadable ({str(e)[:80]})"
        if why is None:
            return feats
        warn(f"feature cache entry {path.name} is bad ({why}); recomputing and replacing it")
        return None

    def put(self, key: str, feats: np.ndarray) -> None:
        if not self.writable:
            return
        digest = hashlib.sha256(feats.tobytes()).hexdigest()
        try:
            write_atomic(self.dir / f"{key}.npz",
                         lambda f: np.savez(f, features=feats, key=np.array(key), digest=np.array(digest)))
        except OSError as e:
            self._read_only(e)


def warn(msg: str) -> None:
    sys.stderr.write(f"warning: {msg}\n")
    sys.stderr.flush()


class FeatureExtractor:
    """Cached features of the VIEWS of each photo, for one base's exact weights: the base graph up
    to its feature tensor, in onnxruntime."""

    def __init__(self, base: Base, cache: Path | None = None):
        self.base = base
        # The preprocessing is part of the key: features made with other preprocessing are others.
        pre = hashlib.sha256(json.dumps(base.identity()["preprocess"], sort_keys=True).encode()).hexdigest()[:16]
        key = f"{base.name}-{base.digest[:16]}"
        root = (cache or cache_root()) / "features" / key

        def version(v: int, count: int) -> FeatureCache:
            return FeatureCache(root / f"views-v{v}-{pre}", f"{key}/{base.digest}/{v}/{pre}", (count, base.feature_dim))

        self.cache = version(VIEWS_VERSION, len(VIEWS))
        # version 3 held the corners' mirror images too: its entries give these eight views as they are
        self.v3 = version(3, 12) if (root / f"views-v3-{pre}").is_dir() else None
        self._session = None

    def cached(self, data: bytes) -> tuple[str, np.ndarray | None]:
        """The photo's cache key and its features if cached (a version 3 entry's, copied forward)."""
        key = self.cache.key(data)
        found = self.cache.get(key)
        if found is None and self.v3 is not None:
            old = self.v3.get(self.v3.key(data))
            if old is not None:
                found = np.ascontiguousarray(old[list(V3_KEPT)])
                self.cache.put(key, found)
        return key, found

    def session(self):  # type: ignore[no-untyped-def]
        if self._session is None:
            from ..sessions import make_session

            self._session = make_session(self.base.adapted(["features"]).SerializeToString(), "cpu")
        return self._session

    def run(self, pixels: np.ndarray, batch: int = BATCH) -> np.ndarray:
        sess = self.session()
        return np.concatenate(
            [sess.run(None, {PIXELS: pixels[i : i + batch]})[0] for i in range(0, len(pixels), batch)]
        )

    def extract(
        self, files: Sequence[Path], on_skip: Callable[[str, str], None] | None = None
    ) -> tuple[np.ndarray, list[int], int]:
        """Features [n_ok, len(VIEWS), D] of the readable files, their positions, and cache hits.

        Written into one array as they come (a photo's slot is its place among the readable ones),
        so the features are held once, not once per photo and again stacked."""
        hits = 0
        out = np.empty((len(files), len(VIEWS), self.base.feature_dim), np.float32)  # pages used as filled
        ok: list[int] = []
        pending: list[tuple[int, str, np.ndarray]] = []  # (slot, cache key, views)
        t0 = time.monotonic()

        def flush() -> None:
            if not pending:
                return
            got = self.run(np.concatenate([v for _, _, v in pending]))
            if not np.isfinite(got).all():  # never cached, never trained on
                raise ExtendserveError(
                    f"the base computed NaN or infinite features for {files[ok[pending[0][0]]]}; check "
                    "its --preprocess (a std of 0 or a wrong scale) and that the model runs in onnxruntime alone")
            for j, (slot, key, _) in enumerate(pending):
                out[slot] = got[j * len(VIEWS) : (j + 1) * len(VIEWS)]
                self.cache.put(key, out[slot])
            pending.clear()

        for i, path in enumerate(files):
            try:
                data = read_photo(path)
            except BadImageError as e:
                if on_skip:
                    on_skip(str(path), str(e).split(": ", 1)[-1])
                continue
            key, cached = self.cached(data)
            if cached is not None:
                out[len(ok)] = cached
                ok.append(i)
                hits += 1
            else:
                try:
                    v = photo_views(data, str(path), self.base.preprocess)
                except BadImageError as e:
                    if on_skip:
                        on_skip(str(path), str(e).split(": ", 1)[-1])
                    continue
                pending.append((len(ok), key, v))
                ok.append(i)
                if len(pending) >= 4:
                    flush()
            progress("features", i + 1, len(files), f"({hits} cached){eta(t0, i + 1, len(files))}")
        flush()
        return out[: len(ok)], ok, hits
