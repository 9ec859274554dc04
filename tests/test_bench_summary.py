"""`make bench`'s closing table reads every benchmark's committed result file: a benchmark whose JSON shape
changed without its extractor would silently drop out of the table (as the pretraining rows once did)."""

from __future__ import annotations

from pathlib import Path

from bench.summary import EXTRACTORS, rows, table

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_every_committed_benchmark_result_gives_its_ratios() -> None:
    got = rows({}, RESULTS)
    for topic in EXTRACTORS:
        values = [v for t, _, _, v in got if t == f"{topic} (earlier run)"]
        assert values, f"no row for {topic}"
        assert all(isinstance(v, float) and v > 0 for v in values), (topic, values)
    names = {n for _, n, _, _ in got}
    assert {f"{m} step / supervised step" for m in ("spark", "byol", "mocov2", "swav")} <= names
    text = table(got)
    assert "n/a" not in text and text.count("\n") == len(got)
