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


def test_other_sizes_get_their_own_rows_from_this_run_and_from_earlier_files(tmp_path: Path) -> None:
    """224 px figures sit beside the 64 px ones: from this run's `other_sizes`, or from the
    `<topic>-<size>px.json` an earlier run wrote; each row names its size and the without-maps ratio."""
    level = {"concurrency": 8, "ratio_to_raw_ort_batch": 0.9, "ratio_to_raw_ort_without_maps": 0.3}
    at224 = {"size": 224, "levels": [level]}
    at64 = {"size": 64, "levels": [{"concurrency": 8, "ratio_to_raw_ort_batch": 0.2}]}
    now = rows({"serving": {**at64, "other_sizes": {"224": at224}}}, tmp_path)
    assert now == [
        ("serving", "HTTP / raw ORT (concurrency 8)", "valid requests/s vs ORT batch images/s, 64 px", 0.2),
        (
            "serving 224 px",
            "HTTP / raw ORT (concurrency 8)",
            "valid requests/s vs ORT batch images/s, 224 px",
            0.9,
        ),
        (
            "serving 224 px",
            "HTTP / raw ORT without maps (concurrency 8)",
            "valid requests/s vs ORT batch images/s of the graph without Grad-CAM, 224 px",
            0.3,
        ),
    ]
    (tmp_path / "serving.json").write_text(json.dumps(at64))
    (tmp_path / "serving-224px.json").write_text(json.dumps(at224))
    earlier = rows({}, tmp_path)
    assert [(t, v) for t, _, _, v in earlier] == [
        ("serving (earlier run)", 0.2),
        ("serving 224 px (earlier run)", 0.9),
        ("serving 224 px (earlier run)", 0.3),
    ]
    # pretraining at 224 px measures SparK and the supervised step only: no threads-layout row, no n/a
    pre = {"image_size": 224, "methods": {"spark": {"overhead_vs_supervised": 2.5}}}
    got = rows({"pretrain": {"image_size": None, "other_sizes": {"224": pre}}}, tmp_path)
    assert [r for r in got if r[0].startswith("pretrain")] == [
        (
            "pretrain 224 px",
            "spark step / supervised step",
            "time per image, same encoder, 224 px, 1 thread",
            2.5,
        )
    ]


def test_bench_sizes_and_where_each_size_is_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench.common import bench_sizes, result_path

    monkeypatch.delenv("BENCH_SIZES", raising=False)
    assert bench_sizes() == [64, 224]
    monkeypatch.setenv("BENCH_SIZES", "224")
    assert bench_sizes() == [224]
    monkeypatch.setenv("BENCH_SIZES", "8")
    with pytest.raises(ValueError):
        bench_sizes()
    assert result_path(tmp_path, "serving", 64, 64) == tmp_path / "serving.json"
    assert result_path(tmp_path, "export", 64, 224) == tmp_path / "export-64px.json"
