"""Shared fixtures: real weights, real onnxruntime, a real model built once per session."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
IMAGENET_SAMPLE = SHARED / "imagenet-sample"
CELEBS = SHARED / "celebs" / "train"

# Tests live in folders by stage, as the package does; a test may use another stage's helpers (the
# real `bentoml serve` of serving/test_service.py, say), so every stage folder is importable.
for _stage in sorted(p for p in (ROOT / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
    if str(_stage) not in sys.path:
        sys.path.insert(0, str(_stage))

needs_shared = pytest.mark.skipif(not IMAGENET_SAMPLE.is_dir() or not CELEBS.is_dir(),
                                  reason="../shared/data is absent (fresh clone)")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("EXTENDSERVE_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ["BENTOML_HOME"] = str(tmp_path_factory.mktemp("bentoml-home"))  # a real store, the tests' own
    # Services started by the tests use onnxruntime (choosing an engine compiles the model in OpenVINO
    # too, seconds per start); the engine choice is tested where it is asked for (test_scale, /info).
    os.environ.setdefault("EXTENDSERVE_ENGINE", "onnxruntime")


def wait_for(what: str, probe, seconds: float = 180, every: float = 0.05):
    """Wait on a state, not a margin: call ``probe()`` until it returns a truthy value (returned), or
    fail after ``seconds`` (a generous deadline, never a measure of speed) saying what was awaited
    and what ``probe`` saw last. ``probe`` may return ``(ok, seen)`` to report what it saw."""
    import time

    deadline, seen = time.monotonic() + seconds, None
    while True:
        got = probe()
        ok, seen = got if isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], bool) else (bool(got), got)
        if ok:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds:.0f} s for {what}; last saw: {str(seen)[:2000]}")
        time.sleep(every)


def run_cli(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``extendserve ARGS`` as a user runs it: its exit code, stdout and stderr.

    Run in this process (``cli.main``), so torch, the backbones and their base graphs load once a
    session rather than once a command (about 6 s each on this 2-core machine, 95 commands); with
    ``env`` (variables read when a module is imported), in a fresh process as before. A crash is
    what a process would show: exit code 1 and the traceback on stderr.
    """
    if env is not None:
        r = subprocess.run([sys.executable, "-m", "extendserve", *args], capture_output=True, text=True,
                           env=os.environ | env)
    else:
        r = _run_cli_here(list(args))
    if check and r.returncode:
        raise AssertionError(f"extendserve {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def _run_cli_here(args: list[str]) -> subprocess.CompletedProcess[str]:
    import contextlib
    import traceback

    from extendserve.cli.parser import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse: --help, --version, a bad option
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["extendserve", *args], code, out.getvalue(), err.getvalue())


def synthetic_photo(kind: int, seed: int, size: tuple[int, int] = (320, 260)) -> Image.Image:
    """Two visually distinct synthetic 'classes': red discs on green, blue stripes on yellow."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.zeros((h, w, 3), np.float64)
    if kind == 0:
        a[...] = (40, 150, 60)
        for _ in range(4):
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(20, 60)
            a[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (220, 30, 30)
    else:
        a[...] = (230, 210, 40)
        period = rng.integers(12, 30)
        a[(xx + yy * rng.uniform(-0.5, 0.5)) % period < period / 2] = (30, 40, 200)
    a += rng.normal(0, 8, a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def jpeg_bytes(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for kind, name in enumerate(["red discs", "blue stripes"]):
        (root / name).mkdir()
        for i in range(6):
            synthetic_photo(kind, 100 * kind + i).save(root / name / f"{i}.jpg", quality=90)
    (root / "red discs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "red discs" / "notes.txt").write_text("not a photo")
    return root


@pytest.fixture(scope="session")
def synthetic_head(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heads") / "shapes.pt"
    run_cli("train-head", str(synthetic_data), "-o", str(out))
    return out


@pytest.fixture(scope="session")
def built_model(synthetic_head: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "shapes"
    run_cli("build", "--new-head", str(synthetic_head), "-o", str(out))
    return out


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9))
            + chunk(b"IEND", b""))


def header_only_jpeg() -> bytes:
    """A JPEG cut just before its scan data: every header, no pixels."""
    data = jpeg_bytes(synthetic_photo(0, 7))
    return data[: data.index(b"\xff\xda")]


def torch_reference(heads: list, pixels: np.ndarray, backbone: str = "efficientnet_lite0") -> np.ndarray:
    """The merged model's logits computed in torch alone (what the merged ONNX graph must reproduce)."""
    import torch

    from extendserve.bases.pretrained import load_backbone
    from extendserve.heads.scoring import TorchMerged

    bb = load_backbone(backbone)
    with torch.no_grad():
        return TorchMerged(bb.model, bb.spec.preprocess, heads).eval()(torch.from_numpy(pixels)).numpy()


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Largest |got - want| per photo, over that photo's largest |logit| (at least 1)."""
    return float((np.abs(got - want).max(1) / np.maximum(1.0, np.abs(want).max(1))).max())
