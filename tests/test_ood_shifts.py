"""Out of distribution on real shifts, with a real OrganAMNIST classifier (64 px, fine-tuned here briefly and
exported with its OOD reference):

- `cthub evaluate-ood` builds every row from real images (real_ct/ DICOM in HU through the model's window,
  head CT PNGs, MR / ultrasound / X-ray objects of pydicom's test files, photographs, matplotlib screen
  captures, the model's own test images in a wrong window), marks each far or near, writes the table and
  records it in the model's card;
- the real 275-slice chest series fnndsc_chest (whole slices) through the analysis layer the server uses: the
  series verdict counts the flagged slices and names the rule (this module's short model), and the series
  is flagged for `make run`'s OrganAMNIST model (models/organamnist-ssl, skipped without a current export).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, copy_of, run_cli, shared_file

from export import export_onnx, onnx_is_fresh
from export.session import OnnxClassifier
from hub.config import ModelConfig

# a generous guard only: the fine-tune fixture alone took over 600 s on 2 cores shared with other jobs
pytestmark = [pytest.mark.shared, pytest.mark.slow, pytest.mark.timeout(3000)]


@pytest.fixture(scope="module")
def organ_model(tmp_path_factory: pytest.TempPathFactory, short_organ_classifier: Path) -> Path:
    """The suite's short real fine-tune at 64 px (its config records the data and split), exported with
    its OOD reference (per-stage PPCA of training images, threshold the 99th percentile of held-out
    scores: validation and cross-fitted training images)."""
    out = copy_of(short_organ_classifier, tmp_path_factory.mktemp("ood_organ") / "clf")
    export_onnx(out, parity_images=32, ood_images=200, threads=1)
    return out


def test_evaluate_ood_measures_every_shift_and_records_the_table(organ_model: Path, tmp_path: Path) -> None:
    shared_file("real_ct")
    argv = ["evaluate-ood", "--model", str(organ_model), "--real-data", str(SHARED_DATA)]
    argv += ["--in-images", "120", "--max-images", "12", "--out", str(tmp_path), "--record", "--json"]
    rc, out = run_cli(argv)
    assert rc == 0
    table = json.loads(out)
    rows = {r["name"]: r for r in table["rows"]}
    expected = {
        "real_ct/fnndsc_chest": "near",
        "real_ct/lung_pet_ct_dx": "near",
        "real_ct/siim_contrast": "near",
        "real_ct/ge_head_tilt": "far",  # head CT for a body model
        "head_ct PNG": "far",
        "MR (pydicom)": "far",
        "ultrasound (pydicom)": "far",
        "X-ray (pydicom)": "far",
        "photographs": "far",
        "screen capture: own test images": "far",
        "screen capture: real CT slices": "far",
        "wrong window: bone": "near",
        "wrong window: lung": "near",
    }
    assert {k: rows[k]["distance"] for k in expected if k in rows} == expected
    assert set(expected) <= set(rows), sorted(set(expected) - set(rows))
    assert table["n_in"] == 120 and rows["wrong window: bone"]["n"] == 120  # the same images, re-windowed
    assert rows["real_ct/fnndsc_chest"]["n"] == 12 and rows["photographs"]["n"] == 36
    for r in rows.values():
        assert 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["fpr_at_95_tpr"] <= 1.0 and r["n"] > 0
    # rendered figures of whole CT slices (white margins, axes, text): far from 64 px organ crops
    # (AUROC 1.000 measured on this fixture's model with 24 figures)
    assert rows["screen capture: real CT slices"]["auroc"] > 0.9
    clf = OnnxClassifier.from_model_dir(organ_model, threads=1)
    assert table["threshold"] == pytest.approx(clf.ood_threshold)
    name = ModelConfig.load(organ_model).name
    assert json.loads((tmp_path / f"{name}.json").read_text())["rows"] == table["rows"]
    assert "| photographs | far | 36 |" in (tmp_path / f"{name}.md").read_text()
    assert ModelConfig.load(organ_model).metrics["ood_shifts"]["rows"] == table["rows"]
    card = (organ_model / "README.md").read_text()
    assert "## Out of distribution, measured" in card and "| real_ct/fnndsc_chest | near | 12 |" in card


def series_answer(model_dir: Path) -> tuple[dict, int]:
    """/predict_series's analysis (the layer the server calls) of the real 275-slice fnndsc_chest series,
    and the number of its slices whose own answer carries the OOD warning."""
    from serving.analysis import Analyzer
    from serving.inference import InferenceEngine
    from serving.settings import ServeSettings

    files = sorted(shared_file("real_ct", "fnndsc_chest").glob("*.dcm"))
    assert len(files) == 275
    served = InferenceEngine(OnnxClassifier.from_model_dir(model_dir, threads=1)).served()
    answer, _ = Analyzer(ServeSettings(), served).analyse_series(files, {})
    return answer, sum(1 for s in answer["slices"] if s["ood"]["warning"])


def test_the_real_chest_series_verdict_counts_its_slices_and_names_the_rule(organ_model: Path) -> None:
    """Whole chest slices shown to the suite's short organ-crop model, through the analysis layer the server
    uses: the series verdict counts the flagged slices, applies the stated share and names the rule.

    Whether this model flags the series is not asserted: a 3-epoch random-init fine-tune's near-shift score
    is not a stable property (0, 1, 16, 85 and 142 of the 275 slices over seeds, training lengths and CPU
    kinds, docs/results/ood-shifts.md). `make run`'s model, whose encoder was pretrained, flags 275 of 275:
    the next test holds that where its export is present."""
    answer, flagged = series_answer(organ_model)
    verdict = answer["series"]["ood"]
    assert (verdict["flagged"], verdict["scored"], verdict["share"]) == (flagged, 275, 0.1)
    assert verdict["warning"] is (flagged >= 28)  # 10% of 275, rounded up
    assert verdict["detail"] == f"{flagged} of 275 slices out of distribution" and "10%" in verdict["rule"]
    assert any(f"{flagged} of 275 slices" in w for w in answer["warnings"]) is verdict["warning"]


MAKE_RUN_MODEL = Path(__file__).resolve().parents[1] / "models" / "organamnist-ssl"


@pytest.mark.skipif(
    not onnx_is_fresh(MAKE_RUN_MODEL),
    reason="needs `make run`'s model (models/organamnist-ssl) with a current export",
)
def test_the_real_chest_series_is_flagged_for_the_served_organ_model() -> None:
    """`make run`'s OrganAMNIST classifier (organ-centred crops): the whole-slice chest series is out of
    distribution (275 of 275 measured, both with the layer4 score and the multi-layer one)."""
    answer, flagged = series_answer(MAKE_RUN_MODEL)
    verdict = answer["series"]["ood"]
    assert verdict["warning"] is True and verdict["flagged"] == flagged >= 28
    assert verdict["detail"] == f"{flagged} of 275 slices out of distribution"
    assert any(f"{flagged} of 275 slices" in w for w in answer["warnings"])
