"""The service's own Prometheus series, on BentoML's /metrics beside its HTTP ones: what it
answers and how sure it is, per head; what each head promised at train-head, beside it; where the
time goes; memory held and refused; workers warm. No torch here.

Every label is bounded: ``model`` (the one served), ``head`` (its heads, and ``unknown``),
``endpoint`` (three), ``stage`` (four). Shares and estimates over a window are Prometheus'
arithmetic on these counters (``deploy/prometheus/rules.yml`` records them): the estimated accuracy
of a head is the mean calibrated top score of the photos it named, sum over count of
``extendserve_top_score``; it follows the truth as docs/quality.md measures. Made with
``bentoml.metrics`` so each worker writes its own multiprocess file and /metrics sums them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from bentoml import metrics as m

from extendserve.serving.runtime import UNKNOWN

from .metrics import ON_SCRAPE

ENDPOINTS = ("classify", "classify_batch", "v2")
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

ANSWERS = m.Counter("extendserve_answers", "Photos answered, by the head of the answer ('unknown': under min_score)",
                    ["model", "endpoint", "head"])
TOP_SCORE = m.Histogram("extendserve_top_score", "The best score of each photo a head named (calibrated: its mean "
                        "is the head's estimated accuracy)", ["model", "head"], buckets=SCORE_BUCKETS)
UNFAMILIAR = m.Counter("extendserve_unfamiliar_photos", "Photos less sure than 99% of those the heads were judged on "
                       "at train-head (drift: a camera, light or kind of photo the heads have not seen)", ["model"])
STAGE = m.Histogram("extendserve_stage_seconds", "Seconds per photo in each stage: decode, queue (waiting for a "
                    "model call), model (the call, per batch), answer", ["stage"], buckets=TIME_BUCKETS)
BATCH = m.Histogram("extendserve_batch_photos", "Photos per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
HELD = m.Gauge("extendserve_memory_held_bytes", "Bytes held for requests in progress", multiprocess_mode="livesum")
BUDGET = m.Gauge("extendserve_memory_budget_bytes", "The workers' memory budgets", multiprocess_mode="livesum")
REFUSED = m.Counter("extendserve_memory_refused", "Requests or photos refused (503) for memory")
READY = m.Gauge("extendserve_workers_ready", "Workers alive that have loaded and warmed the model (counted at each "
                "scrape by the worker answering it)", multiprocess_mode="mostrecent")
WORKERS = m.Gauge("extendserve_workers", "Workers the service runs", multiprocess_mode="max")
PROMISE = m.Gauge("extendserve_head_promise", "What train-head measured a head would do: heldout_accuracy, "
                  "background_taken, strangers_named; and the model's min_score", ["model", "head", "figure"],
                  multiprocess_mode="max")


class Series:
    """One worker's writer of the series, for the model it serves."""

    def __init__(self, model: Any, name: str, workers: int):
        self.name, self.model = name, model
        floors = [h.heldout.get("top_score_q01") for h in model.manifest.heads if h.heldout]
        self.floor = min((f for f in floors if f is not None), default=None)  # None: models from before it
        WORKERS.set(workers)
        for figure, head, value in promises(model.manifest):
            PROMISE.labels(model=name, head=head, figure=figure).set(value)
        # every series at 0 from the start: Prometheus' increase() cannot see a series' first count
        for head in [h.name for h in model.manifest.heads] + [UNKNOWN]:
            for endpoint in ENDPOINTS:
                ANSWERS.labels(model=name, endpoint=endpoint, head=head)
            if head != UNKNOWN:
                TOP_SCORE.labels(model=name, head=head)
        UNFAMILIAR.labels(model=name)
        REFUSED.inc(0)

    @classmethod
    def attach(cls, model: Any, name: str, workers: int, budget: Any, batcher: Any, marks: Any) -> Series:
        """The series of this worker, told of its memory budget's changes, its batcher's model calls, the
        workers found dead (their per-worker gauges dropped) and each scrape (workers warm counted)."""
        series = cls(model, name, workers)
        BUDGET.inc(budget.limit)
        budget.on_change = series._memory
        batcher.on_batch = series.batch
        marks.on_dead = forget
        ON_SCRAPE[:] = [lambda: READY.set(marks.count() or 0)]
        return series

    def answer(self, rows: np.ndarray, top_k: int, min_score: float | None, endpoint: str) -> list[Any]:
        """The model's answers to score rows (top k, 'unknown' first under min_score), counted."""
        t0 = time.perf_counter()
        answers = self.model.top_k(rows, top_k, min_score)
        self.answered(rows, np.array([a[0].index == -1 for a in answers]), endpoint, time.perf_counter() - t0)
        return answers

    @staticmethod
    def _memory(held: int, refused: bool) -> None:
        HELD.set(held)  # livesum: this worker's file holds its own figure
        if refused:
            REFUSED.inc()

    @staticmethod
    def batch(waits: list[float], seconds: float) -> None:
        BATCH.observe(len(waits))
        STAGE.labels(stage="model").observe(seconds)
        for w in waits:
            STAGE.labels(stage="queue").observe(w)

    @staticmethod
    def decoded(seconds: float) -> None:
        STAGE.labels(stage="decode").observe(seconds)

    def answered(self, rows: np.ndarray, unknown: np.ndarray, endpoint: str, seconds: float | None) -> None:
        """Score rows [n, K + N] as answered (``unknown``: which were answered 'unknown'; ``seconds``:
        making the answer, None where the rows are the answer, as /v2's)."""
        best = rows.argmax(1)
        top = rows[np.arange(len(rows)), best]
        heads = self.model.head_of[best]
        for head, score, unsure in zip(heads, top, unknown):
            if unsure:
                ANSWERS.labels(model=self.name, endpoint=endpoint, head=UNKNOWN).inc()
            else:
                ANSWERS.labels(model=self.name, endpoint=endpoint, head=str(head)).inc()
                TOP_SCORE.labels(model=self.name, head=str(head)).observe(float(score))
        if self.floor is not None:
            UNFAMILIAR.labels(model=self.name).inc(int((top < self.floor).sum()))
        if seconds is not None:
            STAGE.labels(stage="answer").observe(seconds / max(len(rows), 1))


def forget(pid: int) -> None:
    """A worker that died without a word (SIGKILL, the memory cgroup): its live gauges (memory held,
    budget) are dropped, or the sums would keep counting it (BentoML marks only clean exits)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess  # after BentoML set the folder up

        multiprocess.mark_process_dead(pid)


def promises(manifest: Any) -> list[tuple[str, str, float]]:
    """(figure, head, value) of every figure the manifest holds for its heads, and the model's min_score."""
    out = []
    for h in manifest.heads:
        held, checks = h.heldout or {}, h.checks or {}
        for figure, value in (("heldout_accuracy", held.get("accuracy")), ("background_taken", held.get("background_taken")),
                              ("strangers_named", checks.get("strangers_named"))):
            if value is not None:
                out.append((figure, h.name, float(value)))
    if manifest.min_score is not None:
        out.append(("min_score", "all", float(manifest.min_score)))
    return out
