"""Reading and writing the user's files safely, whatever they hold (photos, ONNX models, class
lists, head files, checkpoints, caches). No torch, no PIL: every other module may use it.

Reading checks a file is regular and under a size before a byte is read, so a device (/dev/zero)
or a FIFO is refused rather than read without end or waited on. Writing goes to a file beside the
target and is renamed over it, so a crash or a full disk never leaves a half-written file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import ExtendserveError


class FileReadError(ExtendserveError):
    """A file that cannot be read as given (missing, not regular, too large); what it is for is in
    the message, so each caller can say it in its own terms (a photo's becomes a 400)."""


def read_regular_file(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """A regular file's bytes, at most ``limit`` of them; ``what`` names it in the messages."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileReadError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise FileReadError(f"{path}: {kind}; give a {what} file")
    if st.st_size > limit:
        raise FileReadError(f"{path}: {st.st_size / 2**20:.0f} MB is over the {limit / 2**20:.0f} MB limit for a {what}")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise FileReadError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if len(data) > limit:  # it grew after the check
        raise FileReadError(f"{path}: over the {limit / 2**20:.0f} MB limit for a {what}")
    return data


def write_atomic(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], object], sync: bool = False) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` all at once:
    to a hidden file beside it, then renamed over it. ``sync`` forces it to disk first (for what
    must survive a power cut, not for caches)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a folder we cannot write: nothing was left in it either
    return path


class TooComplexError(ExtendserveError):
    """Data (a head file's settings, a manifest) nested or repeated past what any real one holds."""


def check_plain(value: object, what: str, max_items: int = 200_000, max_depth: int = 24,
                max_chars: int = 64 * 2**20, leaf: Callable[[object], bool] = lambda v: False) -> None:
    """Refuse untrusted plain data past a size, walked as a tree: a pickle may share one list
    between many places (``x = [x, x]`` 50 deep is a few hundred bytes that expand to 2^50
    items once copied or written out as JSON), so every place an item appears counts.
    Allowed: dict (str or int keys), list, tuple, str, bytes, int, float, bool, None and what
    ``leaf`` accepts (tensors, for a head file)."""
    items, chars = 0, 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        items += 1
        if items > max_items or depth > max_depth:
            raise TooComplexError(f"{what}: refused: nested {depth} deep or over {max_items} items, which no file "
                                  "extendserve writes holds; it is not used. Give the file extendserve wrote")
        if isinstance(v, (str, bytes)):
            chars += len(v)
            if chars > max_chars:
                raise TooComplexError(f"{what}: refused: over {max_chars // 2**20} MB of text; it is not used")
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, (str, int)):
                    raise TooComplexError(f"{what}: refused: a key of type {type(k).__name__}; only plain data is read")
                stack.append((k, depth + 1))
                stack.append((x, depth + 1))
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)
        elif not (v is None or isinstance(v, (bool, int, float)) or leaf(v)):
            raise TooComplexError(f"{what}: refused: holds a {type(v).__name__}; only tensors and plain data are read")


MAX_DEPTH = 32  # folders within folders under a data folder; past it, a mistake to name, not a walk to make


def walk(root: str | os.PathLike[str], max_depth: int = MAX_DEPTH) -> list[Path]:
    """Everything under ``root`` (files, folders, links), sorted, without recursion (Path.rglob
    recursed: a folder nested 1,500 deep was a RecursionError traceback) and without entering linked
    folders; a folder nested deeper than ``max_depth`` is an error naming it."""
    root = Path(root)
    found: list[Path] = []
    todo = [(root, 0)]
    while todo:
        folder, depth = todo.pop()
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for p in entries:
            found.append(p)
            if p.is_dir() and not p.is_symlink():
                if depth + 1 > max_depth:
                    where = str(folder.relative_to(root))
                    raise ExtendserveError(f"{root}: folders are nested over {max_depth} deep (under {where[:120]}...); "
                                           "a data folder holds one folder of photos per class, with its photos in it")
                todo.append((p, depth + 1))
    return sorted(found)
