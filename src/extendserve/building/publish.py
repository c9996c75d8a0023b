"""Publishing a built model: the output folder policy (checked before any work), the folder
written beside its place and swapped in atomically, and the new version in BentoML's store."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import cache_root
from ..errors import BuildError, ExtendserveError
from .build import BuiltModel
from .manifest import HEADS_DIR, MODEL_FILES, Manifest, is_manifest


@dataclass(frozen=True)
class OutputDir:
    """A folder a build may replace, checked once before any work (see :func:`output_dir`)."""

    given: Path  # as the user wrote it
    final: Path  # every link followed

    def previous(self) -> Manifest | None:
        """The model a publish here replaces (None: nothing, or nothing readable)."""
        try:
            return Manifest.read(self.final / "manifest.json") if (self.final / "manifest.json").is_file() else None
        except ExtendserveError:
            return None


def output_dir(out_dir: str | os.PathLike[str]) -> OutputDir:
    """Where a build may write: ``out_dir`` (a symlink followed to its target) when it is absent,
    empty, or an extendserve model directory holding nothing else. Anything else is refused with
    the fix, before any work is done and without touching it: a build replaces the whole folder."""
    given = Path(out_dir)
    final = Path(os.path.realpath(given))  # follows every link, as the user meant the folder it names
    if not final.exists():
        if final.parent.exists() and not final.parent.is_dir():
            raise BuildError(f"-o {given}: {final.parent} is not a folder")
        return OutputDir(given, final)
    if not final.is_dir():
        raise BuildError(f"-o {given}: {final} is a file, not a model folder; choose another -o")
    entries = sorted(p.name for p in final.iterdir())
    if not entries:
        return OutputDir(given, final)
    if "manifest.json" not in entries or not is_manifest(final / "manifest.json"):
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise BuildError(f"-o {given}: {final} is not empty and not an extendserve model folder (it holds {shown}); "
                         "a build replaces the whole folder, so it writes only into a new or empty folder or an "
                         f"existing model. Give a new folder, for example -o {given / 'my-model'}")
    others = [e for e in entries if e not in MODEL_FILES and e != HEADS_DIR]
    if others:
        raise BuildError(f"-o {given}: the model folder {final} also holds {', '.join(others[:5])}, which a build "
                         "would delete; move them out of it, or choose another -o")
    return OutputDir(given, final)


@contextlib.contextmanager
def build_lock(out: OutputDir, store_name: str | None = None) -> Iterator[None]:
    """Held from before a build's work to its last write: a second build into the same folder or
    the same store name is refused at once (two at once once left a store tag holding the other
    build's files). The lock files live in the cache (none beside the user's folders); the locks
    go with the process."""
    import hashlib

    held: list[int] = []
    where = [(f"dir-{hashlib.sha256(str(out.final).encode()).hexdigest()[:24]}", f"-o {out.given}")]
    if store_name is not None:
        where.append((f"store-{store_name}", f"the store model {store_name}"))
    try:
        for key, what in where:
            fd = _lock_file(key)
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BuildError(f"another build is writing {what} now; wait for it to finish, or build into "
                                 "another -o with another --name") from None
        yield
    finally:
        for fd in held:
            os.close(fd)


def _lock_file(key: str) -> int:
    for root in (cache_root() / "locks", Path(tempfile.gettempdir()) / f"extendserve-locks-{os.getuid()}"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            return os.open(root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
    raise BuildError(f"cannot write a lock file under {cache_root()} or {tempfile.gettempdir()}; set "
                     "EXTENDSERVE_CACHE to a folder this user can write")


def publish(built: BuiltModel, out: OutputDir, store_name: str | None = None) -> tuple[str, bool] | None:
    """Write the model folder (swapped in for ``out`` in one step: a symlinked ``-o`` stays a link,
    to the new model) and, with ``store_name``, save it as a new version in BentoML's model store
    (unless its latest version is this model already): (the tag, whether it is new), if saved."""
    files = built.files()
    write_model_dir(out.final, files)
    if store_name is None:
        return None
    from .store import save_files_to_store

    return save_files_to_store(files, store_name, built.manifest)  # the bytes verified, not the folder read back


def write_model_dir(final: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` into a fresh folder beside ``final`` and swap it in atomically, so a failed
    or killed write leaves any previous model untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-{os.getpid()}-", dir=final.parent))
    try:
        for name, data in files.items():  # the folder is what is swapped in whole: its files written plainly
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            os.chmod(d, 0o755)
        if final.exists():
            _exchange(tmp, final)  # tmp now holds the old model
        else:
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale(final: Path) -> None:
    """Drop what killed builds left beside ``final`` (their process is gone); never ``final``."""
    for p in final.parent.glob(f".{final.name}.building-*"):
        try:
            pid = int(p.name.split("building-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # that build is still running
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE), else a close second."""
    libc_name = ctypes.util.find_library("c")
    if platform.system() == "Linux" and libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if hasattr(libc, "renameat2"):
            AT_FDCWD, RENAME_EXCHANGE = -100, 2
            if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
                return
    old = b.with_name(f".{b.name}.old-{os.getpid()}")
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)
