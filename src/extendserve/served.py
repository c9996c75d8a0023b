"""Which model a service serves: resolved once when the service starts, checked, and pinned.

``bentoml serve`` imports the service module in its main process, then starts the workers with a
copy of that process's environment. The main process resolves the model folder, checks
``model.onnx`` against ``manifest.json``, copies the pair into a private, read-only folder named
by the model's sha256, and records that folder in ``EXTENDSERVE_PINNED_MODEL``; every worker,
including one restarted hours later, loads that copy. A rebuild of the source folder is served
only after a restart of the whole service, never by some workers and not others. No torch here.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from .config import cache_root
from .errors import ExtendserveError
from .runtime import read_model_dir

PIN_ENV = "EXTENDSERVE_PINNED_MODEL"
log = logging.getLogger("extendserve")


def pin_model(directory: str | os.PathLike[str]) -> Path:
    """Check ``directory`` and return its private, immutable copy (made once per sha256)."""
    manifest, data = read_model_dir(directory)
    sha = manifest.model_sha256
    for root in (cache_root() / "served", Path(tempfile.gettempdir()) / f"extendserve-served-{os.getuid()}"):
        pinned = root / sha
        try:
            if (pinned / "model.onnx").is_file():
                read_model_dir(pinned)  # an existing pin must still be intact
                return pinned
        except Exception:  # a damaged pin: replace it below
            shutil.rmtree(pinned, ignore_errors=True)
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=root))
            (tmp / "model.onnx").write_bytes(data)
            shutil.copyfile(Path(directory) / "manifest.json", tmp / "manifest.json")
            read_model_dir(tmp)  # the manifest may have changed since it was read: check the copy
            for f in tmp.iterdir():
                f.chmod(0o444)
            try:
                os.rename(tmp, pinned)
            except OSError:  # another service pinned the same model first
                shutil.rmtree(tmp, ignore_errors=True)
            return pinned
        except PermissionError:
            continue  # a read-only cache: pin under the temporary folder instead
    raise OSError(f"cannot write a private copy of {directory} under {cache_root()} or {tempfile.gettempdir()}")


def served_model_dir(directory: str | os.PathLike[str]) -> Path:
    """The pinned copy for this service: made by the first process to ask (the main process),
    inherited by every worker through the environment."""
    pinned = os.environ.get(PIN_ENV)
    if pinned:
        return Path(pinned)
    path = pin_model(directory)
    os.environ[PIN_ENV] = str(path)
    return path


def check_device(model_dir: str | os.PathLike[str], device: str) -> None:
    """With ``device`` cuda, load the model on CUDA once in a short-lived child process, so a
    machine where CUDA cannot load stops the service at start-up (the workers would only fail one
    by one) and the main process holds no CUDA context. auto and cpu need no check."""
    if device != "cuda":
        return
    code = ("import sys; from extendserve.runtime import make_session; from extendserve.errors import ExtendserveError\n"
            "try: make_session(sys.argv[1] + '/model.onnx', 'cuda')\n"
            "except ExtendserveError as e: sys.exit(str(e))")
    r = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise ExtendserveError((r.stderr.strip().splitlines() or ["CUDA check failed"])[-1])


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig in a child process), or None."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def give_back_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise: six concurrent 256-photo
    batches left a worker +248 to +297 MB for good, bench/batch_memory.py). A no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resolve_served_model(service_file: str | os.PathLike[str], device: str,
                         env: MutableMapping[str, str] = os.environ) -> tuple[str | None, Path, Path]:
    """Which model this service serves: (store tag or None, its folder, the pinned copy).

    ``EXTENDSERVE_MODEL_DIR`` names a folder (development); else a bento serves the model it packs
    (a different ``EXTENDSERVE_MODEL`` is ignored with one line), else ``EXTENDSERVE_MODEL`` names a
    store tag (default the demo's). The main process resolves ``latest`` once and its workers inherit
    the concrete tag through ``env``, so a model saved later is not served by a worker that restarts;
    the device is checked once, in a short-lived child process."""
    from .store import DEFAULT_TAG, packed_tag, resolve

    tag: str | None = None
    if env.get("EXTENDSERVE_MODEL_DIR"):
        source = Path(env["EXTENDSERVE_MODEL_DIR"])
    else:
        packed, asked = packed_tag(service_file), env.get("EXTENDSERVE_MODEL")
        if packed and asked and asked != packed:
            log.warning("extendserve: this bento serves the model it packs, %s; EXTENDSERVE_MODEL=%s is ignored "
                        "(build another bento to serve another model)", packed, asked)
        tag, source = resolve(packed or asked or DEFAULT_TAG)
        env["EXTENDSERVE_MODEL"] = tag
    pinned = served_model_dir(source)
    if env.get("EXTENDSERVE_DEVICE_CHECKED") != str(pinned):
        check_device(pinned, device)
        env["EXTENDSERVE_DEVICE_CHECKED"] = str(pinned)
    return tag, source, pinned
