"""Which workers are alive and warm, and what happens when one dies.

Ready means every worker has warmed up; a worker that dies is replaced (BentoML's own respawn, kept
on in a container too: see :func:`replace_dead_workers`), and one missing too long fails the
liveness probe so that the orchestrator restarts the pod. No torch here.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

READY_ENV = "EXTENDSERVE_READY_DIR"
log = logging.getLogger("extendserve")


def replace_dead_workers() -> None:
    """Called in ``bentoml serve``'s main process before the workers' watcher is made. BentoML turns
    circus' respawn off in a container (``BENTOML_CONTAINERIZED``), leaving it to the orchestrator,
    yet its /livez kept answering 200 from the workers left: a pod with a worker killed by the memory
    cgroup served at part of its capacity, or not at all, for good. A dead worker is replaced here as
    a local ``bentoml serve`` replaces it, and one that cannot be replaced fails /livez."""
    os.environ.pop("BENTOML_CONTAINERIZED", None)


class ReadyMarks:
    """Ready means every worker has warmed up: each leaves a mark named by its pid in a folder the
    main process made (its workers inherit the path); readiness counts the marks of live workers,
    never a zombie's. A worker that dies leaves its mark behind: it becomes ``dead-<pid>``, dated when
    first seen dead, until a warm replacement takes its place; :meth:`missing_for` says how long the
    service has been short of a worker (the liveness probe fails past a limit: a pod that cannot heal
    is restarted). The main process removes the folder when it exits."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.on_dead: Callable[[int], None] | None = None  # told once of each worker first seen dead

    @classmethod
    def for_service(cls) -> ReadyMarks:
        if READY_ENV not in os.environ:  # the main process
            try:
                os.environ[READY_ENV] = folder = tempfile.mkdtemp(prefix="extendserve-ready-")
                atexit.register(_remove_if_main, folder, os.getpid())
            except OSError:
                os.environ[READY_ENV] = ""  # nowhere to write: a worker that answers is a warm one
        return cls(Path(os.environ[READY_ENV]) if os.environ[READY_ENV] else None)

    def mark(self) -> None:
        if self.folder is not None:
            try:
                for dead in sorted(self.folder.glob("dead-*"), key=_mtime)[:1]:  # the one this worker replaces
                    dead.unlink(missing_ok=True)
                (self.folder / str(os.getpid())).touch()
            except OSError:
                self.folder = None

    def count(self) -> int | None:
        """Workers warmed up and alive (None: no folder to count in)."""
        if self.folder is None:
            return None
        try:
            live = 0
            for p in self.folder.iterdir():
                if p.name.startswith("dead-"):
                    continue
                if _alive(p.name):
                    live += 1
                else:  # dated now, when first seen dead
                    try:
                        p.rename(self.folder / f"dead-{p.name}")
                        os.utime(self.folder / f"dead-{p.name}")
                        if self.on_dead is not None and p.name.isdigit():
                            self.on_dead(int(p.name))
                    except OSError:
                        pass  # another worker saw it first
            return live
        except OSError:
            return None

    def missing_for(self, workers: int) -> float:
        """Seconds since a worker that had warmed up died without a warm replacement (0: none missing)."""
        n = self.count()
        if n is None or self.folder is None:
            return 0.0
        try:
            dead = list(self.folder.glob("dead-*"))
            if n >= workers:
                for d in dead:
                    d.unlink(missing_ok=True)
                return 0.0
            return max((time.time() - _mtime(d) for d in dead), default=0.0)
        except OSError:
            return 0.0

    def all(self, workers: int) -> bool:
        n = self.count()
        return n is None or n >= workers

    def alive(self, workers: int, heal_s: float) -> bool:
        """False (BentoML's /livez 503, so the orchestrator restarts the pod) once a worker that died
        has gone unreplaced for ``heal_s``: a pod at part of its capacity for good is not live."""
        missing = self.missing_for(workers)
        if missing > heal_s:
            log.error("extendserve: a worker died %.0f s ago and has not been replaced (EXTENDSERVE_HEAL_S=%.0f); "
                      "/livez fails so that the pod is restarted", missing, heal_s)
        return missing <= heal_s


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return time.time()


def _remove_if_main(folder: str, pid: int) -> None:
    """At exit, the main process removes the marks' folder (its workers inherit this hook: they leave it)."""
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: str) -> bool:
    """A process that runs: not gone, and not a zombie (dead, not yet reaped: kill(pid, 0) succeeds)."""
    try:
        n = int(pid)
        os.kill(n, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{n}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True  # no /proc: kill() said it exists
