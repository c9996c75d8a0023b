"""Which model a service serves: resolved once when the service starts, checked, and pinned.

``bentoml serve`` imports the service module in its main process, then starts the workers with a
copy of that process's environment. The main process resolves the model folder, reads
``model.onnx`` and ``manifest.json`` once, checks them against each other, writes those very bytes
into a new private folder of its own (``mkdtemp``: this user only, never one found there, so a
folder planted by another user or left by another service is never served), and records it in
``EXTENDSERVE_PINNED_MODEL`` with the model's sha256; every worker, including one restarted hours
later, loads that copy and checks its sha256. A rebuild of the source folder is served only after
a restart of the whole service, never by some workers and not others. Where no folder can be
written (a read-only cache and /tmp), the service still starts: its workers read the source folder
and refuse a model whose sha256 is not the one the main process checked. No torch here.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from ..building.manifest import Manifest, read_model_dir
from ..config import cache_root
from ..errors import ExtendserveError

PIN_ENV = "EXTENDSERVE_PINNED_MODEL"
ENGINE_ENV = "EXTENDSERVE_ENGINE_CHOICE"
log = logging.getLogger("extendserve")


PIN_SHA_ENV = "EXTENDSERVE_PINNED_SHA256"


def pin_model(directory: str | os.PathLike[str]) -> Path:
    """Check ``directory`` and return a private copy of it written now by this process (or the
    folder itself where nothing can be written: the workers then check its sha256)."""
    manifest, data = read_model_dir(directory)
    manifest_bytes = manifest.to_bytes()  # the manifest as read and checked, not the file read again
    for root in (cache_root() / "served", Path(tempfile.gettempdir()) / f"extendserve-served-{os.getuid()}"):
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            _drop_stale_pins(root)
            pinned = Path(tempfile.mkdtemp(prefix=f"{manifest.model_sha256[:12]}-{os.getpid()}-", dir=root))
            (pinned / "model.onnx").write_bytes(data)
            (pinned / "manifest.json").write_bytes(manifest_bytes)
            read_model_dir(pinned)  # what was written is what was checked
            for f in pinned.iterdir():
                f.chmod(0o444)
            return pinned
        except OSError as e:  # a read-only cache (EROFS, EACCES): the next place, then none
            log.info("extendserve: cannot pin the model under %s (%s)", root, e.strerror or e)
    log.warning("extendserve: no writable folder for a private copy of the model (cache and %s are read-only); "
                "serving %s in place, its sha256 checked by every worker", tempfile.gettempdir(), directory)
    return Path(directory)


def _drop_stale_pins(root: Path) -> None:
    """Copies pinned by services that have ended (their pid is gone); only this user's."""
    for p in root.iterdir():
        try:
            pid = int(p.name.split("-")[1])
            if p.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            for f in p.iterdir() if p.is_dir() else []:
                f.chmod(0o644)
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            continue


def served_model_dir(directory: str | os.PathLike[str]) -> Path:
    """The pinned copy for this service: made by the first process to ask (the main process),
    inherited by every worker through the environment with the sha256 it must have."""
    pinned = os.environ.get(PIN_ENV)
    if pinned:  # a worker: the manifest's sha256 here, model.onnx's bytes against it when the model loads
        want = os.environ.get(PIN_SHA_ENV)
        got = Manifest.read(Path(pinned) / "manifest.json").model_sha256
        if want and got != want:
            raise ExtendserveError(f"{pinned}: the model changed since the service started (sha256 "
                                   f"{got[:12]}, started with {want[:12]}); restart the service")
        return Path(pinned)
    path = pin_model(directory)  # read and checked there, once
    if path != Path(directory):  # a private copy: gone when the main process exits
        atexit.register(_unpin_if_main, path, os.getpid())
    os.environ[PIN_ENV] = str(path)
    os.environ[PIN_SHA_ENV] = Manifest.read(path / "manifest.json").model_sha256
    return path


def _unpin_if_main(path: Path, pid: int) -> None:
    if os.getpid() == pid:
        for f in path.iterdir() if path.is_dir() else []:
            f.chmod(0o644)
        shutil.rmtree(path, ignore_errors=True)


def check_device(model_dir: str | os.PathLike[str], device: str) -> None:
    """With ``device`` cuda, load the model on CUDA once in a short-lived child process, so a
    machine where CUDA cannot load stops the service at start-up (the workers would only fail one
    by one) and the main process holds no CUDA context. auto and cpu need no check."""
    if device != "cuda":
        return
    code = ("import sys; from extendserve.sessions import make_session; from extendserve.errors import ExtendserveError\n"
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
    batches left a worker +248 to +297 MB for good, bench/serving/batch_memory.py). A no-op without glibc."""
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
    from ..building.store import DEFAULT_TAG, packed_tag, resolve

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


def engine_choice(model_dir: Path, s: Any) -> dict[str, Any] | None:
    """The CPU engine's report for this service (``s``: its settings): measured once, in the main
    process, and handed to every worker through the environment they inherit. Two workers that
    measured for themselves once chose two engines for one model (a difference of noise), and a
    photo's score then depended on the worker that answered. None: the engine is forced."""
    if s.engine != "auto":
        return None
    key = f"{model_dir}|{s.device}|{s.threads}|{s.workers}"
    try:
        got = json.loads(os.environ.get(ENGINE_ENV, "null"))
        if isinstance(got, dict) and got.get("for") == key and isinstance(got.get("report"), dict):
            return got["report"]  # a worker: the main process chose
    except ValueError:
        pass
    report = _measured_engine(model_dir, s)
    report = report | {"chosen": f"once at start, for all {s.workers} worker(s)"}
    os.environ[ENGINE_ENV] = json.dumps({"for": key, "report": report})
    return report


def _measured_engine(model_dir: Path, s: Any) -> dict[str, Any]:
    """The engines measured in a short-lived child process, so the main process never holds them:
    measured in place, an OpenVINO model, two onnxruntime sessions and their arenas stayed in it for
    the life of the service (+156 MB of the pod's memory, bench/serving/peers.py)."""
    code = ("import json, sys; from extendserve.serving.runtime import Model\n"
            "m = Model(sys.argv[1], device=sys.argv[2], threads=int(sys.argv[3]), engine='auto', workers=int(sys.argv[4]))\n"
            "print(json.dumps(m.engine_report))")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(model_dir), s.device, str(s.threads), str(s.workers)],
                           capture_output=True, text=True, timeout=900)
        report = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        report = None
    if not isinstance(report, dict) or report.get("engine") not in ("onnxruntime", "openvino"):
        log.warning("extendserve: the engines could not be measured (%s); onnxruntime serves",
                    (r.stderr.strip().splitlines() or ["no answer"])[-1][:200] if "r" in locals() else "no answer")
        return {"engine": "onnxruntime", "why": "the engines could not be measured"}
    return report
