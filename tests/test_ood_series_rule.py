"""The series out-of-distribution rule (`serving.results.series_ood`): a series is flagged when at least a
stated share of its scored slices (and at least one) is, and the answer names the rule and the count; the
AUROC / FPR-at-95%-TPR figures of `export.ood_shifts` against a brute-force count over all pairs."""

from __future__ import annotations

import numpy as np
import pytest

from cthub.errors import ConfigError
from export.ood_shifts import auroc_and_fpr95
from serving.results import aggregate_series, series_ood, series_ood_note
from serving.settings import DEFAULT_SERIES_OOD_SHARE, ServeSettings


def test_a_series_is_flagged_when_its_share_of_flagged_slices_reaches_the_setting() -> None:
    threshold = 10.0
    scores: list[float | None] = [5.0] * 247 + [20.0] * 28  # 28 of 275 = 10.2% above: the median is 5
    verdict = series_ood(scores, threshold, 0.1)
    assert verdict["warning"] is True and verdict["score"] == pytest.approx(5.0)  # the median would hide it
    assert (verdict["flagged"], verdict["scored"]) == (28, 275)
    assert verdict["detail"] == "28 of 275 slices out of distribution" and "10%" in verdict["rule"]
    note = series_ood_note(verdict)
    assert note is not None and "28 of 275 slices" in note and verdict["rule"] in note
    fewer = series_ood([5.0] * 248 + [20.0] * 27, threshold, 0.1)  # 27 < ceil(27.5)
    assert fewer["warning"] is False and fewer["detail"] == "27 of 275 slices out of distribution"
    assert series_ood_note(fewer) is None


def test_one_flagged_slice_of_a_one_slice_series_and_unscored_slices() -> None:
    assert series_ood([11.0], 10.0, 0.1)["warning"] is True  # at least one slice, whatever the share
    assert series_ood([9.0], 10.0, 0.1)["warning"] is False
    some = series_ood([None, 11.0, None, 9.0], 10.0, 0.5)  # shares of the slices that have a score
    assert (some["flagged"], some["scored"], some["warning"]) == (1, 2, True)
    none = series_ood([1.0, 2.0], None, 0.1)  # an export without a reference: no verdict, said so
    assert none["available"] is False and none["warning"] is None
    assert "re-export" in (series_ood_note(none) or "")


def test_aggregate_series_carries_the_verdict_and_the_setting_is_read_and_checked() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    out = aggregate_series(probs, ["a", "b"], None, 3, [1.0, 12.0, 13.0], ood_threshold=10.0, ood_share=0.5)
    assert out["ood"]["warning"] is True and out["ood"]["flagged"] == 2 and out["ood_median"] == 12.0
    assert ServeSettings.from_env({}).series_ood_share == DEFAULT_SERIES_OOD_SHARE
    assert ServeSettings.from_env({"CTHUB_SERIES_OOD_SHARE": "0.25"}).series_ood_share == 0.25
    with pytest.raises(ConfigError, match="CTHUB_SERIES_OOD_SHARE"):
        ServeSettings.from_env({"CTHUB_SERIES_OOD_SHARE": "1.5"})


def test_auroc_and_fpr_at_95_tpr_match_a_count_over_all_pairs() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 300), rng.normal(1.5, 1, 120)
    auroc, fpr = auroc_and_fpr95(a, b)
    pairs = (b[:, None] > a[None, :]).mean() + 0.5 * (b[:, None] == a[None, :]).mean()
    assert auroc == pytest.approx(pairs)
    cut = np.sort(b)[int(np.floor(0.05 * (len(b) - 1)))]  # 95% of the shift at or above it
    assert (b >= cut).mean() >= 0.95 and fpr == pytest.approx((a >= cut).mean())
    assert auroc_and_fpr95(a, a + 100.0) == (1.0, 0.0)
