"""Bodies sent fast, then stalled: what six of them do to one worker's memory.

    python bench/serving/stall_bench.py

One worker serving the demo model (models/default); six connections to /classify_batch each send
100 MB at once (of a 200 MB Content-Length) and then nothing. Prints the worker's RSS at start,
with the bodies held, after the answers (408 for a stalled body, 503 past the per-worker budget of
bytes still arriving) and after the clients close, and whether /classify still answers.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "serving"))

from conftest import IMAGENET_SAMPLE  # noqa: E402
from test_service import Server, read_reply  # noqa: E402


def rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            total += next(int(ln.split()[1]) for ln in open(f"/proc/{p}/status") if ln.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def main() -> None:
    s = Server(ROOT / "models" / "default", Path("/tmp"), EXTENDSERVE_WORKERS="1", EXTENDSERVE_ENGINE="onnxruntime")
    try:
        w = s.workers()
        print(f"worker RSS at start: {rss_mb(w):.0f} MB")
        socks, chunk = [], b"x" * (1 << 20)
        for _ in range(6):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=60)
            c.sendall(b"POST /classify_batch HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 200000000\r\n\r\n")
            try:
                for _ in range(100):
                    c.sendall(chunk)
            except OSError:
                pass  # refused (503) while sending
            socks.append(c)
        print(f"with 6 x 100 MB sent and then nothing: {rss_mb(w):.0f} MB")
        t0 = time.time()
        for i, c in enumerate(socks):
            c.settimeout(30)
            reply = read_reply(c)
            print(f"  connection {i}: {reply.split(chr(13))[0] if reply else '(closed)'} after {time.time() - t0:.1f} s")
        time.sleep(1)
        print(f"after the answers: {rss_mb(w):.0f} MB")
        for c in socks:
            c.close()
        time.sleep(2)
        photo = (IMAGENET_SAMPLE / "n01440764_tench.JPEG").read_bytes()
        print(f"after the clients closed: {rss_mb(w):.0f} MB; /classify answers "
              f"{s.post('/classify', [('image', photo, 't.jpg')])[0]}; traceback in the log: {'Traceback' in s.logs()}")
    finally:
        s.stop()


if __name__ == "__main__":
    main()
