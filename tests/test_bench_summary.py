"""`make bench`'s closing table reads every benchmark's committed result file: a benchmark whose JSON shape
changed without its extractor would silently drop out of the table (as the pretraining rows once did)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_each_ratio_is_the_one_its_raw_measurements_give() -> None:
    """The table's values are what each result file measured, row for row: recomputed here from the raw
    timings and rates (rounded as the benchmarks round), and one row per measured entry."""
    raw = {t: json.loads((RESULTS / f"{t}.json").read_text()) for t in EXTRACTORS}
    got = {(t.removesuffix(" (earlier run)"), n): v for t, n, _, v in rows({}, RESULTS)}
    hub = raw["hub"]["median_s"]
    assert got["hub", "hub load / torch.load"] == pytest.approx(
        hub["from_pretrained"] / hub["torch_load_pth"], abs=1e-3
    )
    pre = raw["pretrain"]
    sup = pre["supervised"]["images_per_s_serial"]
    for m, res in pre["methods"].items():
        assert got["pretrain", f"{m} step / supervised step"] == pytest.approx(
            sup / res["images_per_s_serial"], rel=0.01
        )
    ft = raw["finetune"]["train_images_per_s_64px"]
    for k in ft:
        if k != "fp32_eager":
            want = ft[k] / ft["fp32_eager"]
            assert got["finetune", f"fine-tune {k} / fp32 eager"] == pytest.approx(want, abs=0.01)
    counts = {t: sum(1 for topic, _ in got if topic == t) for t in EXTRACTORS}
    assert counts["pretrain"] == len(pre["methods"]) + 1
    assert counts["export"] == 2 * len(raw["export"]["images_per_s"])
    assert counts["serving"] == len(raw["serving"]["levels"])
    assert counts["preprocess"] == len(raw["preprocess"]["slices"])


def test_a_result_whose_shape_changed_shows_as_missing_not_as_a_number() -> None:
    """A benchmark that renamed its keys yields no value (the checks above then fail), and a result from
    this run is labelled as such, not as an earlier run."""
    got = rows({"hub": {"ratio_renamed": 1.9}}, RESULTS)
    hub = [r for r in got if r[0].startswith("hub")]
    assert hub == [("hub", "hub load / torch.load", hub[0][2], None)]
    assert "n/a" in table(hub)
