"""Progress of the long steps (features, training), on stderr: one updating line on a terminal."""

from __future__ import annotations

import sys


def progress(label: str, done: int, total: int, extra: str = "") -> None:
    """One updating line on a terminal, a line per 10% otherwise (logs stay short)."""
    tty = sys.stderr.isatty()
    if tty or done == total or (total >= 10 and done % max(1, total // 10) == 0):
        end = "\r" if tty and done < total else "\n"
        sys.stderr.write(f"{label}: {done}/{total}{(' ' + extra) if extra else ''}{end}")
        sys.stderr.flush()


def eta(started: float, done: int, total: int) -> str:
    """", about 2m10s left" from the rate so far (``started``: time.monotonic() at the start)."""
    import time

    if done >= total or done < 2:
        return ""
    left = (time.monotonic() - started) / done * (total - done)
    return f", about {int(left // 60)}m{int(left % 60):02d}s left" if left >= 60 else f", about {left:.0f}s left"
