"""The budgets of the main job (`cthub quickstart --budget`), apart from `quickstart.pipeline` so that the
command line offers them without loading the hub (torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Budget:
    """How much work each step may do. `minutes` are rough estimates on a 2-core AVX2 CPU (for the ETA)."""

    name: str
    pretrain_steps: int
    pretrain_max_minutes: float
    pretrain_image_size: int
    image_size: int
    epochs: int
    head_epochs: int
    patience: int
    max_val: int
    max_test: int
    int8_calibration: int
    int8_eval: int
    fraction: float | None = None
    max_train: int | None = None
    pretrain_extra: tuple[str, ...] = ()
    export_extra: tuple[str, ...] = ()
    minutes: dict[str, float] = field(default_factory=dict)


BUDGETS: dict[str, Budget] = {
    # SparK for 200 steps of 64 images (~0.37 epoch of OrganAMNIST), then 1% of the labels (~346 images,
    # ~31 per class), 64 px as in `make study`.
    "quick": Budget(
        name="quick",
        pretrain_steps=200,
        pretrain_max_minutes=14.0,
        pretrain_image_size=64,
        image_size=64,
        epochs=20,
        head_epochs=2,
        patience=6,
        max_val=1000,
        max_test=2000,
        int8_calibration=256,
        int8_eval=2000,
        fraction=0.01,
        pretrain_extra=("--probe-max-train", "1000"),
        minutes={"encoder": 10.0, "classify": 6.0, "export": 2.0},
    ),
    # The same path in about a minute, for the CI smoke test: says nothing about accuracy.
    "tiny": Budget(
        name="tiny",
        pretrain_steps=3,
        pretrain_max_minutes=2.0,
        pretrain_image_size=64,  # SparK needs a 2x2 patch grid to mask anything
        image_size=32,
        epochs=1,
        head_epochs=1,
        patience=1,
        max_val=100,
        max_test=200,
        int8_calibration=16,
        int8_eval=100,
        max_train=66,
        pretrain_extra=(
            "--batch-size",
            "8",
            "--max-images",
            "256",
            "--probe-max-train",
            "33",
            "--monitor-size",
            "200",
        ),
        export_extra=("--parity-images", "32", "--ood-images", "120"),
        minutes={"encoder": 0.5, "classify": 0.5, "export": 0.5},
    ),
}
