"""An interrupted fine-tuning run continues from its checkpoint and ends exactly where the uninterrupted run
ends (same epochs, selection, weights and test metrics); a checkpoint of another run is not used."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch

from ctdata.labeled import load_splits, select_splits
from finetune.config import FinetuneConfig
from finetune.resume import FitCheckpoint
from finetune.train import fit

pytestmark = pytest.mark.shared

CFG = FinetuneConfig(image_size=32, epochs=3, head_epochs=1, patience=0, batch_size=32, threads=1, lr=1e-3)
TIMING = ("epoch_s", "images_per_s")


class Interrupted(Exception):
    """Stands in for the session's end (a kill) after a given epoch."""


def _stop_after(n: int):
    def on_epoch(rec: dict) -> None:
        if rec["epoch"] == n:
            raise Interrupted

    return on_epoch


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


@pytest.fixture(scope="module")
def splits(organamnist_npz: Path):
    return select_splits(
        load_splits(organamnist_npz), split_seed=0, train_size=0.004, max_val=120, max_test=150
    )


def test_an_interrupted_run_resumes_and_ends_like_the_uninterrupted_one(
    splits, tmp_path: Path, caplog
) -> None:
    train, val, test = splits
    whole = fit("scratch", train, val, test, CFG)

    ckpt = FitCheckpoint(tmp_path / "cell.pt", every_s=0)  # every epoch, so the interruption loses none
    with pytest.raises(Interrupted):
        fit("scratch", train, val, test, CFG, on_epoch=_stop_after(2), checkpoint=ckpt)
    assert ckpt.path.is_file()
    seen: list[int] = []
    with caplog.at_level(logging.INFO, logger="finetune.train"):
        resumed = fit(
            "scratch", train, val, test, CFG, on_epoch=lambda r: seen.append(r["epoch"]), checkpoint=ckpt
        )
    assert seen == [3]  # only the epoch the interrupted run had not done
    assert "resuming at epoch 3 of 3" in caplog.text
    assert not ckpt.path.exists()  # finished: nothing left to resume

    assert _untimed(resumed.history) == _untimed(whole.history)
    assert resumed.best_epoch == whole.best_epoch
    assert resumed.test_metrics == whole.test_metrics
    for (name, a), b in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_run_is_not_used(splits, tmp_path: Path, caplog) -> None:
    train, val, _ = splits
    ckpt = FitCheckpoint(tmp_path / "cell.pt", every_s=0)
    seen: list[int] = []

    def run(cfg: FinetuneConfig, stop: int | None = None) -> None:
        seen.clear()

        def on_epoch(rec: dict) -> None:
            seen.append(rec["epoch"])
            if rec["epoch"] == stop:
                raise Interrupted

        with contextlib.suppress(Interrupted):
            fit("scratch", train, val, None, cfg, on_epoch=on_epoch, checkpoint=ckpt)

    run(CFG, stop=1)
    with caplog.at_level(logging.WARNING, logger="finetune.resume"):
        run(CFG.replace(lr=5e-4, epochs=2))  # another recipe: the saved epoch is not its epoch
    assert seen == [1, 2] and "belongs to another run" in caplog.text
    # a larger epoch budget or another thread count is the same run: it continues
    run(CFG.replace(epochs=2), stop=1)
    run(CFG.replace(epochs=3, threads=2))
    assert seen == [2, 3]
