"""Which engine runs a built model on the CPU: onnxruntime, or OpenVINO where it is installed,
measures faster for this model on this CPU by more than the noise, and gives the same top-1
decisions. No torch here.

Chosen once, when a model is loaded (``EXTENDSERVE_ENGINE=auto``, the service's default): both run
the same ``model.onnx`` on a fixed set of inputs, any top-1 that differs keeps onnxruntime, then each
is timed at batch 8 in alternating trials, and OpenVINO serves only if it is faster by more than the
trials' own spread (and at least ``MIN_GAIN``). Nothing is read back from a cache: a file another
process planted cannot pick the engine, and a service chooses in its main process and hands the
choice to its workers (``decided``), so one model on one machine has one engine. OpenVINO runs in
f32 (``INFERENCE_PRECISION_HINT``): its default on CPUs with AMX is bf16, which flipped 5 of 293
real photos' top-1 when measured. bf16 only where the model was built with ``--cpu-precision bf16``
(build reports the decisions it changes; a CPU without bf16 runs f32 anyway, and says so).
``EXTENDSERVE_ENGINE=onnxruntime|openvino`` forces one. The GPU path is onnxruntime-gpu alone.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import ExtendserveError

ENGINES = ("auto", "onnxruntime", "openvino")
CHECK_BATCH = 8
MIN_GAIN = 0.05  # OpenVINO must be at least this much faster (and beyond the trials' spread) to serve
TRIALS = 3  # alternating timing trials per engine


class Engine(Protocol):
    name: str

    def run(self, outputs: list[str], pixels: np.ndarray) -> list[np.ndarray]: ...


class OrtEngine:
    name = "onnxruntime"

    def __init__(self, session: Any, input_name: str):
        self.session, self.input_name = session, input_name

    def run(self, outputs: list[str], pixels: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(outputs, {self.input_name: pixels}))


class OpenVinoEngine:
    name = "openvino"

    def __init__(self, model_path: Path, threads: int | None = None, precision: str = "f32"):
        import openvino as ov  # optional: only where it is installed

        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        # what it runs in, not what was asked: a CPU without bf16 instructions keeps f32
        self.precision = precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        # every name of each output: a tensor may carry several (a plain model's logits is also base_logits)
        self.names = [set(o.get_names()) for o in self.compiled.outputs]
        self._local = threading.local()  # an infer request per thread: they are not shared safely

    def run(self, outputs: list[str], pixels: np.ndarray) -> list[np.ndarray]:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        req.infer({0: np.ascontiguousarray(pixels)})
        return [np.array(req.get_output_tensor(self._index(o)).data) for o in outputs]

    def _index(self, output: str) -> int:
        for i, names in enumerate(self.names):
            if output in names:
                return i
        raise ExtendserveError(f"the model has no output {output!r}; rebuild it with this extendserve")


def precision_name(hint: Any) -> str:
    """OpenVINO's precision hint as ``bf16`` or ``f32``: it answers with a type (``<Type:
    'bfloat16'>``, ``bf16`` from ``get_type_name``), not the string it was given."""
    text = str(getattr(hint, "get_type_name", lambda: hint)()).lower() + " " + str(hint).lower()
    return "bf16" if "bf16" in text or "bfloat16" in text else "f32"


def check_inputs(size: int, n: int = 24, seed: int = 0) -> np.ndarray:
    """Smooth synthetic scenes and noise: inputs on which two engines' top-1 must agree."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    scenes = []
    for i in range(n - 4):
        f, p = rng.uniform(1, 9, 3), rng.uniform(0, 6.3, 3)
        scenes.append(np.stack([np.sin(f[c] * xx + f[(c + 1) % 3] * yy + p[c]) * 110 + 128 for c in range(3)], -1))
    noise = rng.integers(0, 256, (4, size, size, 3))
    return np.concatenate([np.stack(scenes), noise]).clip(0, 255).astype(np.uint8)


def _rate(engines: list[Engine], x: np.ndarray, seconds: float = 0.6) -> float:
    """Photos/s of ``engines`` run at once, one thread each, as the service's workers run theirs."""
    from concurrent.futures import ThreadPoolExecutor

    def one(engine: Engine) -> int:
        engine.run(["logits"], x)
        calls, t_end = 0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            engine.run(["logits"], x)
            calls += 1
        return calls * len(x)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(engines)) as pool:
        done = sum(pool.map(one, engines))
    return done / (time.perf_counter() - t0)


def cpu_model() -> str:
    """The CPU's model name (engines are measured per CPU; benchmarks name the machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _logits(engine: Engine, x: np.ndarray) -> np.ndarray:
    return np.concatenate([engine.run(["logits"], x[i : i + CHECK_BATCH])[0] for i in range(0, len(x), CHECK_BATCH)])


def precision_changes(model_path: Path, pixels: np.ndarray, want: np.ndarray, precision: str = "bf16") -> dict[str, Any]:
    """What OpenVINO at ``precision`` changes against ``want`` (onnxruntime's f32 logits of these
    inputs): for ``build --cpu-precision bf16`` to report before anyone serves it."""
    try:
        ov_engine = OpenVinoEngine(model_path, precision=precision)
    except ImportError:
        raise ExtendserveError(f"--cpu-precision {precision} runs on OpenVINO, which is not installed: "
                               "pip install openvino, or build without --cpu-precision") from None
    got = _logits(ov_engine, pixels)
    changed = int((want.argmax(1) != got.argmax(1)).sum())
    return {"asked": precision, "runs_here": ov_engine.precision, "inputs": int(len(pixels)),
            "top1_changed": changed, "max_abs_diff": float(np.abs(want - got).max()),
            "cpu": cpu_model()}


def choose(ort_engine: OrtEngine, model_path: Path, size: int, wanted: str = "auto",
           threads: int | None = None, precision: str = "f32",
           decided: dict[str, Any] | None = None, workers: int = 1) -> tuple[Engine, dict[str, Any]]:
    """The CPU engine for this model, and what was checked and measured to pick it. With
    ``precision="bf16"`` (the model's builder asked for it) OpenVINO may change decisions: they are
    counted and shown, not refused; the faster engine still serves. ``decided``: the report of a
    choice already made for this model on this machine (the service's main process): that engine
    serves, nothing is measured again. ``workers``: the engines are measured as served, that many
    copies of each at once (one alone measured OpenVINO 11-15% faster where two at once, as two
    workers run, measured it 1.7x slower: the choice then cost a fifth of the service's rate)."""
    if wanted not in ENGINES:
        raise ExtendserveError(f"EXTENDSERVE_ENGINE={wanted!r} is not valid; give one of {', '.join(ENGINES)}")
    if decided is not None:
        if decided.get("engine") == "openvino":
            return OpenVinoEngine(model_path, threads, precision), decided
        return ort_engine, decided
    if wanted == "onnxruntime":
        return ort_engine, {"engine": "onnxruntime", "why": "EXTENDSERVE_ENGINE=onnxruntime"}
    try:
        ov_engine = OpenVinoEngine(model_path, threads, precision)
    except ImportError:
        if wanted == "openvino":
            raise ExtendserveError("EXTENDSERVE_ENGINE=openvino but OpenVINO is not installed: pip install openvino, "
                                   "or set EXTENDSERVE_ENGINE=auto") from None
        return ort_engine, {"engine": "onnxruntime", "why": "OpenVINO is not installed"}
    except Exception as e:  # OpenVINO's own errors: an op it lacks, say
        if wanted == "openvino":
            raise ExtendserveError(f"OpenVINO cannot run this model ({str(e)[:200]}); set EXTENDSERVE_ENGINE=auto") from None
        return ort_engine, {"engine": "onnxruntime", "why": f"OpenVINO cannot run this model ({str(e)[:120]})"}
    x = check_inputs(size)
    want, got = _logits(ort_engine, x), _logits(ov_engine, x)
    differ = int((want.argmax(1) != got.argmax(1)).sum())
    report: dict[str, Any] = {"checked_inputs": int(len(x)), "top1_differ": differ,
                              "max_abs_diff": float(np.abs(want - got).max()), "openvino_precision": ov_engine.precision}
    if differ and ov_engine.precision == "f32":
        if wanted == "openvino":
            raise ExtendserveError(f"OpenVINO changes {differ} of {len(x)} top-1 decisions of this model; "
                                   "set EXTENDSERVE_ENGINE=auto or onnxruntime")
        return ort_engine, report | {"engine": "onnxruntime", "why": "OpenVINO's top-1 differed"}
    if wanted == "openvino":
        return ov_engine, report | {"engine": "openvino", "why": "EXTENDSERVE_ENGINE=openvino"}
    from .sessions import make_session

    copies = max(0, workers - 1)
    orts: list[Engine] = [ort_engine] + [OrtEngine(make_session(model_path, "cpu", threads), ort_engine.input_name)
                                         for _ in range(copies)]
    ovs: list[Engine] = [ov_engine] + [OpenVinoEngine(model_path, threads, precision) for _ in range(copies)]
    rates, spread = measure(orts, ovs, x[:CHECK_BATCH])
    need = max(MIN_GAIN, spread)
    gain = rates["openvino"] / rates["onnxruntime"] - 1
    faster = ov_engine if gain > need else ort_engine
    why = (f"OpenVINO measured {gain:+.0%} against onnxruntime at batch {CHECK_BATCH}, {workers} at once as the "
           f"workers run, "
           + ("more" if faster is ov_engine else "not more") + f" than the {need:.0%} it must gain "
           f"(the trials' spread, at least {MIN_GAIN:.0%})")
    return faster, report | {"engine": faster.name, "photos_per_s": rates, "spread": spread, "why": why}


def measure(orts: list[Engine], ovs: list[Engine], x: np.ndarray) -> tuple[dict[str, float], float]:
    """Median photos/s of each engine (its copies run at once) over alternating trials, and the
    trials' relative spread (the larger of the two engines' (max - min) / median): the noise a winner must beat."""
    trials: dict[str, list[float]] = {orts[0].name: [], ovs[0].name: []}
    for _ in range(TRIALS):
        for es in (orts, ovs):
            trials[es[0].name].append(_rate(es, x, 0.4))
    rates = {k: float(np.median(v)) for k, v in trials.items()}
    spread = max((max(v) - min(v)) / max(np.median(v), 1e-9) for v in trials.values())
    return rates, float(spread)
