"""The image's own check (``make test-image``; CI runs it after ``make test``): the real
``extendserve:cpu`` image, run as a cluster runs it, spoken to by real clients.

Not collected by ``make test`` (its name does not start with ``test_``): building the image takes
minutes. Needs the image built (``make image``) and docker or podman.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import IMAGENET_SAMPLE, ROOT, jpeg_bytes, synthetic_photo, wait_for

IMAGE = os.environ.get("IMAGE", "extendserve:cpu")
ENGINE = os.environ.get("ENGINE") or ("docker" if shutil.which("docker") and subprocess.run(
    ["docker", "info"], capture_output=True).returncode == 0 else "podman")
if ENGINE == "podman":
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def the_photo() -> tuple[bytes, str]:
    """A real photo and the demo model's ImageNet name for it: the shared tench where the shared
    photos are, else Grace Hopper from matplotlib's sample data (what `make serve` shows)."""
    tench = IMAGENET_SAMPLE / "n01440764_tench.JPEG"
    if tench.is_file():
        return tench.read_bytes(), "tench"
    from extendserve.building.demo import demo_photos

    return Path(demo_photos()["Grace Hopper (demo)"]).read_bytes(), "military uniform"


POD = ("--memory", "3g", "--cpus", "2")  # as deploy/kubernetes.yaml limits the pod


class Container:
    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = f"extendserve-check-{self.port}"
        t0 = time.time()
        subprocess.run([ENGINE, "run", "-d", "--name", self.name, "--network", "host", "--read-only", "--tmpfs",
                        "/tmp:size=512m", "-e", f"BENTOML_PORT={self.port}", *extra, IMAGE], check=True,
                       capture_output=True, text=True)
        deadline = t0 + 300
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(self.url + "/readyz", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
            if not self.running():
                raise RuntimeError("the container exited:\n" + self.logs())
        else:
            raise RuntimeError("not ready in 300 s:\n" + self.logs())
        self.ready_s = time.time() - t0

    def running(self) -> bool:
        r = subprocess.run([ENGINE, "inspect", "-f", "{{.State.Running}}", self.name], capture_output=True, text=True)
        return r.stdout.strip() == "true"

    def logs(self) -> str:
        r = subprocess.run([ENGINE, "logs", self.name], capture_output=True, text=True)
        return r.stdout + r.stderr

    def exec(self, *cmd: str) -> str:
        return subprocess.run([ENGINE, "exec", self.name, *cmd], capture_output=True, text=True, check=True).stdout

    def remove(self) -> None:
        subprocess.run([ENGINE, "rm", "-f", self.name], capture_output=True)

    def workers(self) -> list[int]:
        """The pids (inside the container) of BentoML's workers."""
        code = ("import os\n"
                "for p in set(filter(str.isdigit, os.listdir('/proc'))) - {str(os.getpid())}:\n"
                "    try:\n"
                "        cmd, stat = open(f'/proc/{p}/cmdline', 'rb').read(), open(f'/proc/{p}/stat').read()\n"
                "    except OSError:\n"
                "        continue\n"
                "    if b'_bentoml_impl.worker' in cmd and stat.split(')')[1].split()[0] != 'Z':\n"
                "        print(p)")
        return sorted(int(x) for x in self.exec("python3", "-c", code).split())

    def info(self) -> dict:
        with urllib.request.urlopen(self.url + "/info", timeout=30) as r:
            return json.loads(r.read())


def classify(url: str, photo: bytes, path: str = "/classify", timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=photo, method="POST", headers={"Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def box():
    if subprocess.run([ENGINE, "image", "inspect", IMAGE], capture_output=True).returncode:
        pytest.fail(f"no image {IMAGE}: build it with make image")
    c = Container(*POD)
    print(f"\n{IMAGE}: ready {c.ready_s:.1f} s after `{ENGINE} run`")
    yield c
    c.remove()


def test_ready_read_only_and_not_root(box):
    assert box.exec("id", "-u").strip() != "0"
    with pytest.raises(subprocess.CalledProcessError):
        box.exec("touch", "/home/bentoml/x")  # the root filesystem is read-only
    info = box.info()
    assert info["workers"]["workers"] >= 1 and info["workers"]["threads_per_worker"] >= 1
    assert info["versions"]["extendserve"]


def test_classify_names_the_photo(box):
    photo, label = the_photo()
    status, body = classify(box.url, photo)
    assert status == 200 and body["predictions"][0]["label"] == label, body
    status, body = classify(box.url, b"not a photo")
    assert status == 400 and "error" in body


def test_open_inference_protocol_with_tritonclient(box):
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    photo, label = the_photo()
    name = box.info()["model_tag"].split(":")[0]
    client = tc.InferenceServerClient(box.url.removeprefix("http://"))
    assert client.is_server_ready() and client.is_model_ready(name)
    for binary in (True, False):
        inp = tc.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([photo if binary else base64.b64encode(photo)], dtype=object),
                                binary_data=binary)
        out = tc.InferRequestedOutput("scores", binary_data=binary, class_count=3)
        top = client.infer(name, [inp], outputs=[out]).as_numpy("scores")[0][0]
        top = top.decode() if isinstance(top, bytes) else top
        assert top.split(":", 2)[2] == label, top
    bad = tc.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not a photo"], dtype=object), binary_data=True)
    with pytest.raises(InferenceServerException) as e:
        client.infer(name, [bad])
    assert e.value.status() == "400"


def test_workers_follow_the_cpu_quota():
    """Given one CPU (--cpus 1), the container starts one worker with one thread, whatever the host has."""
    c = Container("--cpus", "1")
    try:
        w = c.info()["workers"]
        assert w["cpus"] == 1 and w["workers"] == 1 and w["threads_per_worker"] == 1, w
    finally:
        c.remove()


def in_progress(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("bentoml_service_request_in_progress{") and 'endpoint="/classify"' in ln)


def test_requests_in_flight_are_answered_on_sigterm():
    """A rolling update stops the container (SIGTERM) while requests are in flight: each is answered."""
    c = Container()
    photos = [jpeg_bytes(synthetic_photo(i % 2, i, (1600, 1200))) for i in range(24)]
    try:
        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(classify, c.url, p) for p in photos]
            wait_for("every request taken by a worker (BentoML's in-progress gauge)",
                     lambda: (in_progress(c.url) == len(photos) or any(f.done() for f in futures), in_progress(c.url)))
            stop = subprocess.run([ENGINE, "stop", "-t", "60", c.name], capture_output=True, text=True)
            results = [f.result() for f in futures]
        assert stop.returncode == 0
        assert [s for s, _ in results] == [200] * len(photos), [s for s, _ in results]
    finally:
        c.remove()


def post(url: str, body: bytes, ctype: str, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_budget_follows_the_pod_and_its_worst_clients_kill_nothing(box):
    """In the pod (--memory 3g, /tmp 512 MB): the budget comes from the cgroup's limit, and the inputs
    that once got workers OOM-killed (a JSON flood on /v2, 240 MB batches three at a time, a flat
    64-megapixel PNG) are each answered 4xx or 503, never 500, with the same workers alive after."""
    from test_pod import batch_body, flat_png

    memory = box.info()["memory"]
    assert "cgroup memory limit 3072 MB" in memory["budget_from"], memory
    workers = box.workers()
    name = box.info()["model_tag"].split(":")[0]
    flood = b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"data":[' + b'"",' * 20_000_000 + b'""]}]}'
    assert post(box.url, flood, "application/json", f"/v2/models/{name}/infer")[0] == 413
    body, ctype = batch_body(10, 24 * 2**20)  # 240 MB of legal parts
    with ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(lambda _: post(box.url, body, ctype, "/classify_batch")[0], range(3)))
    assert set(statuses) <= {400, 413, 503}, statuses
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: post(box.url, flat_png(8000, 8000, "RGB"), "image/png", "/classify")[0], range(4)))
    assert set(statuses) <= {200, 413, 503}, statuses
    assert box.running() and box.workers() == workers, (workers, box.workers(), box.logs()[-3000:])
    photo, label = the_photo()
    assert classify(box.url, photo)[1]["predictions"][0]["label"] == label


def test_a_worker_killed_in_the_pod_is_replaced(box):
    """The image runs BentoML with BENTOML_CONTAINERIZED=true, where a dead worker was never replaced:
    the pod stayed at half capacity, or unready, for good. It is replaced and warmed now."""
    before = box.workers()
    box.exec("python3", "-c", f"import os; os.kill({before[0]}, 9)")

    def state() -> tuple[bool, object]:
        try:
            ready = urllib.request.urlopen(box.url + "/readyz", timeout=10).status == 200
        except (urllib.error.URLError, OSError):
            ready = False
        now = box.workers()
        return before[0] not in now and len(now) == len(before) and ready, now

    wait_for("the killed worker replaced and warm in the container (/readyz 200)", state, 300, 0.5)
    assert box.info()["workers"]["warm"] == len(before)
    photo, label = the_photo()
    assert classify(box.url, photo)[1]["predictions"][0]["label"] == label


def test_the_serving_user_cannot_change_what_it_runs(box):
    """The code, the model and site-packages belong to root, not writable by the serving user: a
    writable root filesystem would be no worse than the read-only one."""
    code = ("import os, sys\n"
            "bad = []\n"
            "for top in ('/home/bentoml/bento', '/app/.venv'):\n"
            "    for d, dirs, files in os.walk(top):\n"
            "        for p in [d] + [os.path.join(d, f) for f in files]:\n"
            "            st = os.lstat(p)\n"
            "            if not os.path.islink(p) and (st.st_uid != 0 or st.st_mode & 0o022):\n"
            "                bad.append(p)\n"
            "print(len(bad), bad[:5])")
    out = box.exec("python3", "-c", code)
    assert out.startswith("0 "), out
