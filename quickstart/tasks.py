"""The tasks of the main job (`cthub quickstart --task`): what a task decides besides its labeled data.

A task names the served model's folders, the input size, the HU window applied to DICOM input, what the
model expects to be shown (an organ-centred crop, a whole slice), which encoder measurements rank encoders
for it, and how each budget is adjusted for it. Kept apart from `quickstart.pipeline` so the command line
offers the tasks without loading torch.

    organamnist  OrganAMNIST's 11 organs, 64 px crops of abdominal CT (abdominal window from the source):
                 `make run`'s default
    head-ct      head CT hemorrhage (the head CT PNG set, or any labeled head CT folder / CSV / DICOM+CSV)
                 at the paper's 224 px, brain window (35/80 HU) on DICOM input; whole slices
    slices       any other labeled CT slice source at 224 px, the default HU interval mapping; whole slices
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quickstart.budgets import BUDGETS, Budget

ORGAN_CROP = "organ-centred crop"
WHOLE_SLICE = "whole slice"


@dataclass(frozen=True)
class Task:
    """A named task preset: see the module docstring."""

    name: str
    description: str
    image_size: int
    window: str | None  # HU window preset for DICOM sources (None: the source's own or the default mapping)
    input_expectation: str
    study_prefixes: tuple[str, ...]  # `metrics.finetune_study` keys (data file names) measured on this task
    monitor_names: tuple[str, ...] = ()  # kNN monitor data (folder/file names) that is this task's data
    study_fraction: str = "100%"  # the study row (share of training labels) that ranks encoders
    budget_changes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def crop_trained(self) -> bool:
        return self.input_expectation == ORGAN_CROP

    def budget(self, name: str) -> Budget:
        """The budget `name` as this task runs it (input size and fine-tuning schedule adjusted)."""
        base = replace(BUDGETS[name], image_size=self.image_size)
        return replace(base, **self.budget_changes.get(name, {}))

    def classifier_dir(self, models: Path) -> Path:
        return models / f"{self.name}-ssl"

    def baseline_dir(self, models: Path) -> Path:
        return models / f"{self.name}-scratch"


# Fine-tuning at 224 px on 2 cores, measured (scanner-resolution.md, "Served at 224 px"): ~6 img/s for a
# training step of one thread with the other core running the second fine-tune (idle machine; ~2 img/s when
# other jobs share the cores). Fold 0 of the paper's 5 stratified folds (144 train, 16 val, 40 test slices of
# head_ct); 8 epochs after the head-only one. `minutes` (the progress line's estimate) is the idle first run
# of 2026-12-07 with an empty hub: short encoder 6.0, both fine-tunes 3.8, export 0.9 min.
WHOLE_SLICE_QUICK: dict[str, Any] = {
    "epochs": 9,
    "head_epochs": 1,
    "patience": 4,
    "max_val": 0,
    "max_test": 0,
    "fraction": None,
    "max_train": None,
    "int8_calibration": 64,
    "int8_eval": 40,
    "export_extra": ("--parity-images", "16"),
    "minutes": {"encoder": 6.0, "classify": 4.0, "export": 1.0},
}
# The CI smoke test of a whole-slice task: 64 px (a 224 px step would cost minutes), one epoch.
WHOLE_SLICE_TINY: dict[str, Any] = {"image_size": 64, "max_train": 40, "max_val": 0, "max_test": 0}

TASKS: dict[str, Task] = {
    "organamnist": Task(
        name="organamnist",
        description="OrganAMNIST organ classification, 64 px organ-centred crops (abdominal window)",
        image_size=64,
        window=None,  # the source's own mapping (ctdata.source_preprocessing: abdomen)
        input_expectation=ORGAN_CROP,
        study_prefixes=("organamnist",),
        monitor_names=("organamnist",),
        study_fraction="1%",
        budget_changes={"tiny": {"image_size": 32}},
    ),
    "head-ct": Task(
        name="head-ct",
        description="head CT hemorrhage, 224 px whole slices, brain window (35/80 HU) on DICOM input",
        image_size=224,
        window="brain",
        input_expectation=WHOLE_SLICE,
        study_prefixes=("head_ct",),
        monitor_names=("head_ct",),
        budget_changes={"quick": WHOLE_SLICE_QUICK, "tiny": WHOLE_SLICE_TINY},
    ),
    "slices": Task(
        name="slices",
        description="any labeled CT slices, 224 px whole slices, the default HU interval mapping",
        image_size=224,
        window=None,
        input_expectation=WHOLE_SLICE,
        study_prefixes=(),
        budget_changes={"quick": WHOLE_SLICE_QUICK, "tiny": WHOLE_SLICE_TINY},
    ),
}


def task_for(data: str | Path, task: str | None = None) -> Task:
    """The named task, else the one the data implies: a MedMNIST .npz is OrganAMNIST's, a source named
    head_ct is head CT, any other labeled source the generic whole-slice task."""
    if task:
        return TASKS[task]
    p = Path(data)
    if p.suffix == ".npz":
        return TASKS["organamnist"]
    names = {p.name.lower(), p.stem.lower(), p.parent.name.lower() if p.is_file() else ""}
    return TASKS["head-ct"] if {"head_ct", "head-ct"} & names else TASKS["slices"]
