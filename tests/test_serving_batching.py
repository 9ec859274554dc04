"""The in-process batcher (`serving.batching.ForwardQueue`): the API worker's forward passes, merged across
request threads, when the model runs in the API worker (CTHUB_INFERENCE=in-process, the default).

A real exported ResNet50 (64 px, BatchNorm calibrated on real CT slices) and real DICOM slices through the
real `InferenceEngine`. A gate holds the first forward pass until the other requests are queued, so what
merges is decided, not left to timing. Checks: every caller gets the engine's own answer for its own slices
(never a neighbour's), the waiting requests of one pass are merged up to the batch size, passes with and
without maps are never mixed, a request larger than the batch size is cut, the latency budget answers 503
(ServiceBusyError) to those who waited too long, and a failed pass fails its callers only. A real server in
this layout: tests/test_serving_api.py (concurrent uploads batched and never swapped)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from helpers import calibrated_resnet, need

from ctdata.preprocess import PreprocessConfig, prepare
from cthub.errors import ServiceBusyError
from export import export_onnx
from export.session import OnnxClassifier
from hub import ModelConfig, save_pretrained
from serving.batching import ForwardQueue
from serving.inference import InferenceEngine

SIZE = 64
ORGANS = ["liver", "kidney", "lung"]
SLICES = ("CT_small.dcm", "693_UNCI.dcm")
ATOL = 1e-5


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> InferenceEngine:
    cfg = ModelConfig(
        name="batching-test", num_classes=3, labels=ORGANS, preprocessing=PreprocessConfig(input_size=SIZE)
    )
    sources = [need(n) for n in SLICES]
    out = save_pretrained(calibrated_resnet(cfg, sources), tmp_path_factory.mktemp("b") / "m", cfg)
    export_onnx(out, tolerance=1e-3, threads=1)
    clf = OnnxClassifier.from_model_dir(out, threads=1)
    clf.prepare_without_maps()
    return InferenceEngine(clf)


@pytest.fixture(scope="module")
def inputs(engine: InferenceEngine) -> np.ndarray:
    """Eight distinct real inputs: two slices, each flipped and rotated."""
    pp = engine.classifier.config.preprocessing
    x = torch.stack([prepare(need(n), pp) for n in SLICES])
    views = [x, x.flip(-1), x.flip(-2), x.transpose(-1, -2)]
    return torch.cat(views).numpy()


class Gated:
    """`run` whose first call waits until `release` is set; records every batch size it was called with."""

    def __init__(self, run: Callable[[np.ndarray], list[dict[str, Any]]]) -> None:
        self.run = run
        self.release = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> list[dict[str, Any]]:
        self.sizes.append(len(batch))
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(60)
        return self.run(batch)


@pytest.fixture
def queue() -> Iterator[ForwardQueue]:
    q = ForwardQueue(max_batch=4, max_latency_ms=60_000)
    yield q
    q.close()


def queued(q: ForwardQueue, n: int) -> None:
    """Wait until `n` jobs wait in `q` (the gate holds the one being run)."""
    for _ in range(6000):
        if q.waiting() >= n:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{n} jobs never queued")


def test_waiting_requests_merge_and_each_gets_its_own_answer(
    engine: InferenceEngine, inputs: np.ndarray, queue: ForwardQueue
) -> None:
    gate = Gated(engine.run_without_maps)
    infer = queue.bind(gate)
    ref = engine.run_without_maps(inputs)
    for a in range(len(ref)):  # distinct answers: a swapped one would not pass
        for b in range(a):
            assert np.abs(np.subtract(ref[a]["logits"], ref[b]["logits"])).max() > 20 * ATOL
    with ThreadPoolExecutor(len(inputs)) as pool:
        first = pool.submit(infer, inputs[:1])
        assert gate.entered.wait(60)
        rest = [pool.submit(infer, inputs[i : i + 1]) for i in range(1, len(inputs))]
        queued(queue, len(inputs) - 1)
        gate.release.set()
        answers = [first.result(60), *(f.result(60) for f in rest)]
    # one pass alone (held), then the seven waiting ones in passes of at most 4, oldest first
    assert gate.sizes == [1, 4, 3]
    for i, (got,) in enumerate(answers):
        np.testing.assert_allclose(got["logits"], ref[i]["logits"], atol=ATOL)
        assert got["cam"] is None
    # which request joined which pass follows the order the threads reached the queue
    assert sorted(a[0]["batch_size"] for a in answers) == [1, 3, 3, 3, 4, 4, 4, 4]


def test_passes_with_and_without_maps_are_never_mixed(
    engine: InferenceEngine, inputs: np.ndarray, queue: ForwardQueue
) -> None:
    gate = Gated(engine.run)
    with_maps, plain = queue.bind(gate), queue.bind(engine.run_without_maps)
    with ThreadPoolExecutor(6) as pool:
        held = pool.submit(with_maps, inputs[:1])
        assert gate.entered.wait(60)
        jobs = [
            (pool.submit(f, inputs[i : i + 1]), f is with_maps) for i, f in enumerate([plain, with_maps] * 2)
        ]
        queued(queue, 4)
        gate.release.set()
        assert held.result(60)[0]["cam"] is not None
        for future, maps in jobs:
            (got,) = future.result(60)
            assert (got["cam"] is not None) == maps and got["batch_size"] == 2
    assert gate.sizes == [1, 2]  # the two queued map requests, in one pass of their own


def test_a_request_larger_than_the_batch_is_cut_and_answered_in_order(
    engine: InferenceEngine, inputs: np.ndarray, queue: ForwardQueue
) -> None:
    sizes: list[int] = []

    def run(batch: np.ndarray) -> list[dict[str, Any]]:
        sizes.append(len(batch))
        return engine.run_without_maps(batch)

    got = queue.bind(run)(inputs[:7])
    assert sizes == [4, 3]
    ref = engine.run_without_maps(inputs[:7])
    np.testing.assert_allclose([g["logits"] for g in got], [r["logits"] for r in ref], atol=ATOL)


def test_a_request_that_waited_past_the_budget_is_busy_not_run(
    engine: InferenceEngine, inputs: np.ndarray
) -> None:
    q = ForwardQueue(max_batch=4, max_latency_ms=50)
    try:
        gate = Gated(engine.run_without_maps)
        infer = q.bind(gate)
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(infer, inputs[:1])
            assert gate.entered.wait(60)
            late = pool.submit(infer, inputs[1:2])
            queued(q, 1)
            threading.Event().wait(0.2)  # past the 50 ms budget
            gate.release.set()
            assert held.result(60)[0]["batch_size"] == 1
            with pytest.raises(ServiceBusyError, match="50 ms"):
                late.result(60)
        assert gate.sizes == [1]  # the late request never reached the model
        assert infer(inputs[2:3])[0]["batch_size"] == 1  # and the queue serves on
    finally:
        q.close()


def test_a_failed_pass_fails_its_callers_and_the_queue_serves_on(
    engine: InferenceEngine, inputs: np.ndarray, queue: ForwardQueue
) -> None:
    def broken(batch: np.ndarray) -> list[dict[str, Any]]:
        raise ValueError("bad input shape")

    with pytest.raises(ValueError, match="bad input shape"):
        queue.bind(broken)(inputs[:2])
    (got,) = queue.bind(engine.run_without_maps)(inputs[:1])
    np.testing.assert_allclose(got["logits"], engine.run_without_maps(inputs[:1])[0]["logits"], atol=ATOL)


def test_a_closed_queue_refuses_new_work(inputs: np.ndarray) -> None:
    q = ForwardQueue(max_batch=2, max_latency_ms=1000)
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.bind(lambda b: [])(inputs[:1])


def test_two_forward_threads_run_two_passes_at_once(engine: InferenceEngine, inputs: np.ndarray) -> None:
    """CTHUB_FORWARD_THREADS=2: while one pass is held, the next request runs on the other thread."""
    q = ForwardQueue(max_batch=4, max_latency_ms=60_000, threads=2)
    try:
        gate = Gated(engine.run_without_maps)
        infer = q.bind(gate)
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(infer, inputs[:1])
            assert gate.entered.wait(60)
            (other,) = pool.submit(infer, inputs[1:2]).result(60)  # answered while the first is held
            assert not held.done()
            gate.release.set()
            assert held.result(60)[0]["batch_size"] == 1 and other["batch_size"] == 1
        assert gate.sizes == [1, 1]
    finally:
        q.close()
