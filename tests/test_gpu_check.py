"""`make gpu-check` without a GPU: the dry run of bench/gpu_check.py (the same steps on the CPU at 64 px) and
what `make gpu-wheels` packs (docs/gpu-check.md). The dry run uses this venv as it is, never the wheels."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, shared_file

from bench.gpu_check import CORE_STEPS, ORGAN_SOURCES, first_existing
from bench.gpu_wheels import IMAGE_PACKAGES, OPTIONAL_ELSEWHERE, WHEELS, normalize, pack_organamnist

pytestmark = pytest.mark.shared


def _organamnist() -> Path:
    npz = first_existing(ORGAN_SOURCES)
    if npz is None:
        pytest.skip("needs OrganAMNIST (../shared/data/organamnist.npz or make gpu-wheels' sample)")
    return npz


def _run(out: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess[str]:
    """`python -m bench.gpu_check --dry-run` with $OUT set (as on the GPU machine), so the CPU dry run is what
    runs even on a machine with CUDA."""
    env = {**os.environ, "OUT": str(out)}
    cmd = [sys.executable, "-m", "bench.gpu_check", "--dry-run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, int, Path]:
    _organamnist()
    out = tmp_path_factory.mktemp("gpu_check_out")
    proc = _run(out)
    result = json.loads((out / "gpu-check-dryrun.json").read_text())
    return result, proc.stdout + proc.stderr, proc.returncode, out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_passes_and_says_so(dry_run: tuple[dict[str, Any], str, int, Path]) -> None:
    result, output, code, out = dry_run
    assert code == 0, output[-4000:]
    assert result["ok"] and result["mode"] == "dry-run" and not result["failed"], result["failed"]
    assert "no GPU found: dry run on CPU" in output
    log = (out / "gpu-check-dryrun.log").read_text()
    assert "no GPU found: dry run on CPU" in log and "ALL CORE STEPS PASSED" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-dryrun.json", "gpu-check-dryrun.log"]
    assert result["environment"]["install"]["installed"] == []  # the venv as it is: no wheel needed
    for step in (*CORE_STEPS, "inference", "compile-spark", "compile-mocov2"):
        assert result["steps"][step]["ok"], (step, result["steps"][step])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_finetune_learns_and_loads_back_on_cpu(
    dry_run: tuple[dict[str, Any], str, int, Path],
) -> None:
    ft = dry_run[0]["steps"]["finetune-organamnist"]
    plan = dry_run[0]["plan"]
    assert ft["epochs"] == plan["ft_epochs"] and ft["steps"] == plan["ft_epochs"] * math.ceil(
        plan["ft_train"] / plan["ft_batch"]
    )
    losses = ft["train_loss"]
    assert len(losses) == plan["ft_epochs"] and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert ft["check_loads_on_cpu"] and ft["check_reloaded_accuracy_close"]
    assert (
        abs(ft["test_accuracy_reloaded_cpu_fp32"] - ft["test_accuracy_on_device"])
        <= 0.05 + 2 / plan["ft_test"]
    )
    assert ft["train_images_per_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_pretrains_exports_and_parity_holds(dry_run: tuple[dict[str, Any], str, int, Path]) -> None:
    steps, plan = dry_run[0]["steps"], dry_run[0]["plan"]
    for method in ("spark", "mocov2"):
        pt = steps[f"pretrain-{method}"]
        assert pt["steps"] == plan["pt_steps"] and pt["recipe"] == "lidc-paper"
        assert pt["loss_logged"] and all(math.isfinite(v) for v in pt["loss_logged"])
        assert pt["check_encoder_loads_on_cpu"] and pt["images_per_s"] > 0
        comp = steps[f"compile-{method}"]
        assert comp["eager_images_per_s"] > 0 and comp["compiled"].startswith("skipped: dry run")
    ex = steps["export"]
    assert ex["export_report"]["passed"] and "CPUExecutionProvider" in ex["ort_providers"]
    assert ex["images"] == plan["parity_images"]
    assert ex["max_abs_diff_ort_vs_torch_device_fp32"] <= ex["tolerance"]
    assert ex["check_top1_fp32"]
    # the export's own parity inputs: the classifier's test images and pydicom's bundled CT slices
    assert any("CT_small.dcm" in s for s in ex["export_report"]["parity_inputs"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_table_sets_committed_cpu_figures_beside(
    dry_run: tuple[dict[str, Any], str, int, Path],
) -> None:
    table = {r["what"]: r for r in dry_run[0]["table"]}
    committed = json.loads((ROOT / "bench" / "results" / "finetune.json").read_text())
    row = table["fine-tune, train"]
    assert row["cpu_images_per_s"] == committed["train_images_per_s_64px"]["bf16_channels_last"]
    assert row["images_per_s"] == dry_run[0]["steps"]["finetune-organamnist"]["train_images_per_s"]
    assert table["SparK pretrain"]["cpu_images_per_s"] is not None
    assert all(r["peak_gpu_mib"] is None for r in table.values())  # no GPU: no GPU memory figure


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_image_has_or_gets_every_distribution_the_check_imports(
    dry_run: tuple[dict[str, Any], str, int, Path],
) -> None:
    """Every third-party distribution the check imported is on the GPU image, in the wheels `make gpu-wheels`
    carries, or one a library there does without (OPTIONAL_ELSEWHERE, each with its reason)."""
    imported = set(dry_run[0]["imported_distributions"])
    wheels = {normalize(n) for n, _ in WHEELS}
    assert {"pydicom", "torch", "onnxruntime"} <= imported  # the list is real: it holds the check's own needs
    missing = imported - IMAGE_PACKAGES - wheels - set(OPTIONAL_ELSEWHERE)
    assert not missing, f"the GPU image lacks {sorted(missing)}: add them to bench/gpu_wheels.WHEELS"
    assert not wheels & IMAGE_PACKAGES  # never carry what the image has (torch above all)


@pytest.mark.timeout(600)
def test_budget_guard_skips_steps_and_fails_the_check(tmp_path: Path) -> None:
    """With no budget left every step is skipped rather than started, the JSON still comes back, and a check
    whose core steps did not run fails."""
    _organamnist()
    proc = _run(tmp_path, "--budget-s", "0.01", timeout=600)
    result = json.loads((tmp_path / "gpu-check-dryrun.json").read_text())
    assert proc.returncode == 1 and not result["ok"]
    assert set(CORE_STEPS) <= set(result["skipped"]) and not result["failed"]
    for step in ("finetune-organamnist", "pretrain-spark", "pretrain-mocov2", "compile-spark"):
        assert "budget" in result["steps"][step]["skipped"]
    assert "finetune-organamnist did not pass" in result["steps"]["export"]["skipped"]
    assert "did not run" in proc.stdout


def test_pack_organamnist_keeps_every_split_and_class(tmp_path: Path) -> None:
    from ctdata.datasets import load_medmnist, source_preprocessing

    src = shared_file("organamnist.npz")
    with np.load(src) as z:
        n_classes = len(np.unique(z["test_labels"]))
    out = pack_organamnist(src, tmp_path / "organamnist.npz", {"train": 64, "val": 24, "test": 24})
    assert source_preprocessing(out) == source_preprocessing(src)  # the same HU mapping is recognized
    for split, n in (("train", 64), ("val", 24), ("test", 24)):
        part = load_medmnist(out, split)
        assert part.images.dtype == np.uint8 and part.images.shape[1:] == (28, 28)
        assert part.labels is not None and len(part) == n and len(np.unique(part.labels)) == n_classes
