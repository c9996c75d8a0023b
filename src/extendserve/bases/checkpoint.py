"""Reading untrusted PyTorch files (head files, checkpoints): tensors and plain data only.

``torch.load(weights_only=True)`` refuses any pickled object that is not a tensor or a plain
container, so no code in the file can run; before that, the file must be a regular file that
looks like a PyTorch file, so a photo or an empty file gets an answer that says what it is.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import HeadFileError
from ..files import FileReadError, TooComplexError, check_plain, read_regular_file

MAX_HEAD_BYTES = 2 * 1024**3
# What a file's tensors may unpack to: a zip entry's size is read from the zip directory before
# anything is unpacked (a 2.3 MB file of deflated zeros once cost 2.6 GB before it was refused).
# The largest file extendserve writes is far below it (a Lite2 checkpoint: 40 MB).
MAX_UNPACKED_BYTES = 1024**3


def safe_load(path: Path, what: str = "head file") -> Any:
    """``torch.load(weights_only=True)`` of a regular file that looks like a PyTorch file; every
    failure is a :class:`HeadFileError` saying what the file is and what to give instead."""
    p = Path(path)
    if not p.exists():
        raise HeadFileError(f"{path}: no such file")
    if p.is_dir():
        raise HeadFileError(f"{path}: is a directory, expected a {what} (.pt)")
    if not p.is_file():
        raise HeadFileError(f"{path}: not a regular file (a device, FIFO or socket); give a {what} (.pt)")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise HeadFileError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if not magic:
        raise HeadFileError(f"{path}: the file is empty (0 bytes); give a {what} written by torch.save "
                            "(extendserve train-head writes one)")
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch's zip format, or a legacy pickle
        kind = _sniff(magic)
        raise HeadFileError(f"{path}: not a PyTorch file{' (it looks like ' + kind + ')' if kind else ''}; give a "
                            f"{what} written by torch.save (extendserve train-head writes one)")
    try:
        data = read_regular_file(path, MAX_HEAD_BYTES, what)
    except FileReadError as e:
        raise HeadFileError(str(e)) from None
    if magic == b"PK\x03\x04":
        _check_unpacked_size(data, path, what)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise HeadFileError(
            f"{path}: refused: the file holds pickled Python objects other than tensors and plain "
            "data, which could run code when loaded; it is not loaded. Re-save it as tensors only "
            "(torch.save(model.state_dict(), ...)) where it was made"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, IndexError,
            KeyError, TypeError) as e:
        raise HeadFileError(
            f"{path}: not a readable PyTorch file, it is corrupt or truncated "
            f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        ) from None
    try:  # before anything walks, copies or writes it out: bounded as a tree, shared parts counted each time
        check_plain(obj, str(path), leaf=lambda v: isinstance(v, torch.Tensor))
    except TooComplexError as e:
        raise HeadFileError(str(e)) from None
    return obj


def _check_unpacked_size(data: bytes, path: Path, what: str) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            unpacked = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise HeadFileError(f"{path}: not a readable PyTorch file, it is corrupt or truncated ({e})") from None
    if unpacked > MAX_UNPACKED_BYTES:
        raise HeadFileError(f"{path}: refused: its {len(data) / 2**20:.1f} MB unpack to {unpacked / 2**20:.0f} MB, over "
                            f"the {MAX_UNPACKED_BYTES / 2**20:.0f} MB a {what} may hold; it is not loaded. Give the "
                            "file train-head wrote")


def _sniff(magic: bytes) -> str:
    for sig, kind in ((b"\xff\xd8", "a JPEG photo"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
                      (b"%PDF", "a PDF")):
        if magic.startswith(sig):
            return kind
    if all(32 <= b < 127 or b in (9, 10, 13) for b in magic):
        return "text"
    return ""
