"""Adaptive batching inside the API worker: the forward passes of concurrent requests merged into one.

`ForwardQueue` owns the threads that run every forward pass of the process: by default one, one pass at a
time (ONNX Runtime already spreads one pass over every core); with two (`CTHUB_FORWARD_THREADS=2`) two
passes run at once, each on half the cores, which wastes less of them under load
(docs/results/bench-224px.md). Request threads `submit` their preprocessed slices and wait. Whenever a
forward thread is free it takes the oldest waiting request and every other waiting request for the same
model and pass (with or without maps), up to the batch size, and runs them as one batch: under load the
batches grow by themselves, and a lone request never waits for company. A request that waited longer than
the latency budget before its pass began is answered `ServiceBusyError` (503), as BentoML's batcher does in
the two-service layout. A request of more slices than the batch size is cut into passes of at most that
size.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cthub.errors import ServiceBusyError

log = logging.getLogger(__name__)
Infer = Callable[[np.ndarray], list[dict[str, Any]]]


@dataclass
class _Job:
    """One submitted chunk: its slices, which pass runs it, and where its answer goes."""

    key: int
    run: Infer
    inputs: np.ndarray
    observe: Callable[[int], None] | None = None
    queued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[dict[str, Any]] | None = None
    error: Exception | None = None


class ForwardQueue:
    """Forward passes of one process, batched across the threads that submit them (module docstring)."""

    def __init__(
        self, max_batch: int, max_latency_ms: float, threads: int = 1, name: str = "cthub-forward"
    ) -> None:
        if max_batch < 1 or threads < 1:
            raise ValueError(f"max_batch and threads must be at least 1, got {max_batch}, {threads}")
        self.max_batch = max_batch
        self.max_latency_s = max_latency_ms / 1000.0
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._keys = itertools.count()
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def bind(self, run: Infer, observe: Callable[[int], None] | None = None) -> Infer:
        """`run` (slices [B, ...] -> one dict per slice) as a function whose calls from any thread are
        batched with the other calls of the same bound function; `observe` is told the size of each pass
        (the server's metrics)."""
        key = next(self._keys)

        def infer(inputs: np.ndarray) -> list[dict[str, Any]]:
            return self.submit(key, run, inputs, observe)

        return infer

    def submit(
        self, key: int, run: Infer, inputs: np.ndarray, observe: Callable[[int], None] | None = None
    ) -> list[dict[str, Any]]:
        """`run(inputs)`'s answer, computed in passes shared with other jobs of the same `key`; blocks."""
        inputs = np.ascontiguousarray(inputs)
        chunks = [inputs[i : i + self.max_batch] for i in range(0, len(inputs), self.max_batch)]
        jobs = [_Job(key, run, c, observe) for c in chunks]
        with self._cond:
            if self._closed:
                raise RuntimeError("the forward queue is closed")
            self._jobs.extend(jobs)
            self._cond.notify()
        out: list[dict[str, Any]] = []
        for job in jobs:
            job.done.wait()
            if job.error is not None:
                raise job.error
            out.extend(job.outputs or [])
        return out

    def waiting(self) -> int:
        """Jobs queued and not yet taken into a pass (a request of more slices than the batch: several)."""
        with self._cond:
            return len(self._jobs)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the passes under way, answer the waiting jobs with an error, stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest job and the waiting jobs of its key, up to `max_batch` slices."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                for job in self._jobs:
                    job.error = RuntimeError("the server is shutting down")
                    job.done.set()
                self._jobs.clear()
                return None
            first = self._jobs.popleft()
            batch, size = [first], len(first.inputs)
            rest: deque[_Job] = deque()
            while self._jobs:
                job = self._jobs.popleft()
                if job.key == first.key and size + len(job.inputs) <= self.max_batch:
                    batch.append(job)
                    size += len(job.inputs)
                else:
                    rest.append(job)
            self._jobs.extendleft(reversed(rest))
            return batch

    def _serve(self) -> None:
        while (batch := self._take()) is not None:
            now = time.monotonic()
            late = [j for j in batch if now - j.queued > self.max_latency_s]
            for job in late:
                job.error = ServiceBusyError(
                    f"the model is busy beyond its {round(1000 * self.max_latency_s)} ms budget; retry"
                )
                job.done.set()
            batch = [j for j in batch if j.error is None]
            if not batch:
                continue
            try:
                inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([j.inputs for j in batch])
                outputs = batch[0].run(inputs)  # a lone request's slices go in as they are, not copied
            except Exception as e:  # noqa: BLE001 -- every waiting request gets the failure, the thread lives on
                log.error("forward pass failed: %s", type(e).__name__)
                for job in batch:
                    job.error = e
                    job.done.set()
                continue
            if batch[0].observe is not None:
                batch[0].observe(len(outputs))
            start = 0
            for job in batch:
                job.outputs = outputs[start : start + len(job.inputs)]
                start += len(job.inputs)
                job.done.set()
