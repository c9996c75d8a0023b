"""onnxruntime sessions on the CPU or CUDA, checked for what really loaded. No torch here.

onnxruntime-gpu lists ``CUDAExecutionProvider`` even where CUDA cannot load and then quietly runs
on the CPU, so the providers a session *really* uses are read back and reported. Every stage that
runs an ONNX graph (features, verification, serving) makes its sessions here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import onnxruntime as ort

from .errors import ExtendserveError

log = logging.getLogger("extendserve")

DEVICES = ("auto", "cuda", "cpu")


def make_session(
    model: str | os.PathLike[str] | bytes, device: str = "cpu", threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime session on ``device`` (auto|cuda|cpu), checked for what really loaded."""
    if device not in DEVICES:
        raise ExtendserveError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto" and not _gpu_present():
        want_cuda = False  # spare the CPU-only machine onnxruntime's loud CUDA load failure
    providers: list[Any] = ["CPUExecutionProvider"]
    if want_cuda:
        providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
    src = model if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(src, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors
        if want_cuda and device == "auto":
            log.warning("CUDA session failed (%s); falling back to the CPU", e)
            sess = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
        else:
            raise ExtendserveError(f"cannot load the ONNX model {src if isinstance(src, str) else ''}: {e}") from None
    active = sess.get_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in active:
        available = ort.get_available_providers()
        why = (
            "onnxruntime here has no CUDA provider: install onnxruntime-gpu"
            if "CUDAExecutionProvider" not in available
            else f"onnxruntime-gpu is installed but CUDA did not load: check the NVIDIA driver, "
            f"and that the CUDA {cuda_major()} and cuDNN 9 libraries this onnxruntime-gpu needs are on the "
            "library path (pip install 'onnxruntime-gpu[cuda,cudnn]' brings them)"
        )
        raise ExtendserveError(f"EXTENDSERVE_DEVICE=cuda but the model runs on the CPU: {why}")
    return sess


def cuda_major() -> str:
    """The CUDA major version this onnxruntime-gpu was built for (12 up to 1.26, 13 from 1.27), as
    it records it: what its errors and the docs must name."""
    try:
        from onnxruntime.capi import build_and_package_info as info

        return str(getattr(info, "cuda_version", "") or "12").split(".")[0]
    except ImportError:
        return "12"


def _gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")


def active_device(sess: ort.InferenceSession) -> str:
    return "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
