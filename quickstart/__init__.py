"""The main job (`make run` / `cthub quickstart`): the product's own path on real data, each step reused when
its output is current: a SparK encoder (the best `make pretrain` encoder when one exists locally, else a
short, honestly named CPU run) -> a classifier fine-tuned from it on few labels, beside a random-init
classifier trained the same way on the same labels -> ONNX fp32 (+ int8 within tolerance) -> serving."""

from quickstart.pipeline import BUDGETS, Budget, Plan, best_local_encoder, build, plan

__all__ = ["BUDGETS", "Budget", "Plan", "best_local_encoder", "build", "plan"]
