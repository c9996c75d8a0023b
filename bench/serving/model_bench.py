"""Model-only speed, side by side in one run:

- the merged model (one backbone pass) vs the original model plus a separate new-class model;
- onnxruntime vs PyTorch eager on the same merged model (batch 8);
- the merged model at batch 1, 8, 32, 64, with onnxruntime session options (threads, graph
  optimisation, a saved optimised model) and, where CUDA is present, fp32 with IO binding.

The new head is a 5-class gated head with random values: speed does not depend on the values.
Usage: python bench/serving/model_bench.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

from extendserve.bases.base import builtin_base  # noqa: E402
from extendserve.bases.onnx_export import export_module  # noqa: E402
from extendserve.bases.pretrained import load_backbone  # noqa: E402
from extendserve.building.merge import merged_model, wire  # noqa: E402
from extendserve.heads.head import Head  # noqa: E402
from extendserve.sessions import make_session  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import best_rate, torch_merged, write_section  # noqa: E402


class NewOnly(nn.Module):
    """A separate new-class model: its own backbone pass feeding the head."""

    def __init__(self, merged: nn.Module, k: int):
        super().__init__()
        self.merged, self.k = merged, k

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.merged(pixels)[:, self.k:]


def merged_graph(bb, head: Head) -> bytes:  # type: ignore[no-untyped-def]
    base = builtin_base(bb)
    return merged_model(base, [head], wire(base, [head])).SerializeToString()


def random_head(dim: int, n: int = 5, rank: int = 256) -> Head:
    """A head shaped like the default (Mahalanobis-gated) one: the same graph and the same work."""
    g = torch.Generator().manual_seed(0)
    means = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g)).Q
    return Head(classes=[f"class {i}" for i in range(n)], weight=torch.randn(n, dim, generator=g) * 0.01,
                bias=torch.zeros(n), backbone="efficientnet_lite0", backbone_digest="", method="gated",
                extras={"means": means, "basis": basis, "basis_weights": torch.full((rank,), 0.5),
                        "sigma": torch.tensor([1e-4]), "thresholds": torch.full((n,), 100.0),
                        "scale": torch.tensor([40.0])})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--side", choices=["ort", "torch"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return one_side(a.side, a.repeats)
    cores = len(os.sched_getaffinity(0))
    bb = load_backbone()
    size = bb.spec.input_size
    head = random_head(bb.spec.feature_dim)
    merged = torch_merged(bb, [head])
    pixels = (torch.zeros(2, size, size, 3, dtype=torch.uint8),)
    graphs = {
        "merged": merged_graph(bb, head),
        "original": builtin_base(bb).adapted(["logits"]).SerializeToString(),
        "new-only": export_module(NewOnly(merged, len(bb.spec.labels)), pixels, ["pixels"], ["logits"]),
    }
    rng = np.random.default_rng(0)
    lines: list[str] = []

    def x(b: int) -> np.ndarray:
        return rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)

    # 1. merged vs two models, CPU, batch 8 and 32
    import onnxruntime as ort

    def quiet(graph: bytes) -> ort.InferenceSession:
        # Spinning off for all three: two sessions' spinning thread pools would fight each other
        # and make the two-model baseline look worse than two backbone passes really are.
        o = ort.SessionOptions()
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        o.log_severity_level = 3
        return ort.InferenceSession(graph, o, providers=["CPUExecutionProvider"])

    s = {k: quiet(v) for k, v in graphs.items()}
    run = lambda name, v: s[name].run(None, {"pixels": v})  # noqa: E731
    lines += ["### Merged model vs the original plus a separate new-class model (CPU)", "",
              "| batch | merged photos/s | two models photos/s | ratio |", "| --- | --- | --- | --- |"]
    for b in (8, 32):
        v = x(b)
        r_merged = best_rate(lambda: run("merged", v), b, a.repeats)
        r_two = best_rate(lambda: (run("original", v), run("new-only", v)), b, a.repeats)
        lines.append(f"| {b} | {r_merged:.1f} | {r_two:.1f} | {r_merged / r_two:.2f}x |")
        print(lines[-1], flush=True)

    # 2. onnxruntime vs torch eager on the merged model, batch 8: each side in a fresh process of
    # its own (in one process they disturb each other's thread pools: torch measured anywhere from
    # 14 to 47 photos/s), alternating, three rounds.
    rounds = [(side_rate("ort"), side_rate("torch")) for _ in range(3)]
    ratios = sorted(o / p for o, p in rounds)
    lines += ["", "### onnxruntime vs PyTorch eager, same merged model, batch 8 (CPU, each in its own process)", "",
              "| round | onnxruntime photos/s | torch eager photos/s | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {i + 1} | {o:.1f} | {p:.1f} | {o / p:.1f}x |" for i, (o, p) in enumerate(rounds)]
    lines += ["", f"Median ratio: **{ratios[1]:.1f}x** (torch with {torch.get_num_threads()} threads, onnxruntime as shipped)."]
    print("\n".join(lines[-6:]), flush=True)

    # 3. session options, CPU: threads and graph optimisation, by batch size

    def session(threads: int, level: ort.GraphOptimizationLevel, path: str | None = None) -> ort.InferenceSession:
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        o.graph_optimization_level = level
        o.log_severity_level = 3
        return ort.InferenceSession(path or graphs["merged"], o, providers=["CPUExecutionProvider"])

    variants = {
        f"ENABLE_ALL, {cores} threads (shipped)": lambda: session(cores, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        f"ENABLE_BASIC, {cores} threads": lambda: session(cores, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        "ENABLE_ALL, 1 thread": lambda: session(1, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    }
    batches = (1, 8, 32, 64)
    lines += ["", "### Merged model alone by batch size and session options (CPU, photos/s)", "",
              "| session | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "| --- |" + " --- |" * len(batches)]
    for name, make in variants.items():
        sess = make()
        rates = [best_rate(lambda: sess.run(None, {"pixels": x(b)}), b, a.repeats) for b in batches]
        lines.append(f"| {name} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")
        print(lines[-1], flush=True)

    # 4. start-up: a fresh session from model.onnx vs from a saved optimised model
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        raw.write_bytes(graphs["merged"])
        opt_path = Path(tmp) / "model.opt.onnx"
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.optimized_model_filepath = str(opt_path)
        ort.InferenceSession(str(raw), o, providers=["CPUExecutionProvider"])

        def start(path: Path, level: ort.GraphOptimizationLevel) -> float:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                session(cores, level, str(path))
                best = min(best, time.perf_counter() - t0)
            return best

        t_raw = start(raw, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        t_opt = start(opt_path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        lines += ["", "### Session start-up (CPU)", "",
                  f"model.onnx with ENABLE_ALL: {t_raw * 1000:.0f} ms; saved optimised model, optimisation off: "
                  f"{t_opt * 1000:.0f} ms"]
        print(lines[-1], flush=True)

    # 5. GPU: fp32 vs fp16 with IO binding, when CUDA is really there
    lines += ["", "### GPU", ""]
    lines += gpu_rows(graphs["merged"], merged, size, a.repeats)
    print("\n".join(lines))
    write_section("model", "Model alone", "python bench/serving/model_bench.py", "\n".join(lines))


def side_rate(side: str) -> float:
    """photos/s of the merged model at batch 8 in a fresh process: ``ort`` or ``torch`` eager."""
    r = subprocess.run([sys.executable, __file__, "--side", side], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return float(r.stdout.strip().splitlines()[-1])


def one_side(side: str, repeats: int) -> None:
    bb = load_backbone()
    head = random_head(bb.spec.feature_dim)
    merged = torch_merged(bb, [head])
    size = bb.spec.input_size
    v = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    if side == "torch":
        t = torch.from_numpy(v)
        with torch.inference_mode():
            print(best_rate(lambda: merged(t), 8, repeats, 1.0))
    else:
        sess = make_session(merged_graph(bb, head), "cpu")
        print(best_rate(lambda: sess.run(None, {"pixels": v}), 8, repeats, 1.0))


def gpu_rows(onnx_bytes: bytes, merged: nn.Module, size: int, repeats: int) -> list[str]:
    from extendserve.sessions import _gpu_present

    if not _gpu_present():
        return ["No GPU on this machine: the GPU figures (fp32 by batch with IO binding) are pending."]
    try:
        sess32 = make_session(onnx_bytes, "cuda")
    except Exception as e:  # no CUDA here: say so rather than report CPU figures as GPU ones
        return [f"Not measured on this machine ({str(e).splitlines()[0][:160]}). GPU figures are pending."]
    out = ["fp16 variant: not built (no GPU here to check its parity and speed); fp32 with IO binding:", "",
           "| batch | fp32 photos/s |", "| --- | --- |"]
    rng = np.random.default_rng(1)
    for b in (1, 8, 64):
        v = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
        out.append(f"| {b} | {best_rate(lambda: _bound(sess32, v), b, repeats):.0f} |")
    return out


def _bound(sess, pixels: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    binding = sess.io_binding()
    binding.bind_cpu_input("pixels", pixels)
    binding.bind_output("logits")
    sess.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


if __name__ == "__main__":
    main()
