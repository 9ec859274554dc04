"""Watching a pretraining run learn: an online kNN monitor and the encoder's movement from its start.

Every `every` steps the encoder (eval mode, its own running BN statistics, no gradients) embeds a small
labeled held-out set: half of it is the kNN bank, half the queries (k=20, cosine, exp(sim/0.07) votes, as
solo-learn's and lightly's monitors). Each check appends a row to `monitor.csv` with the kNN accuracy and
macro AUC, the majority-class accuracy for reference, the collapse statistic, and the relative change of the
encoder's weights from its initialisation, per stage. A few seconds every few minutes at 64 px.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ctdata.datasets import ArraySplit
from ctdata.labeled import labels_of, load_splits
from ctdata.preprocess import PreprocessConfig
from ctdata.splits import stratified_subset
from cthub.errors import DataError
from finetune.evaluate import collapse_std, knn_eval
from finetune.probe import extract_features
from hub.resnet import ResNet50

log = logging.getLogger(__name__)

STAGE_PREFIXES = ("conv1", "layer1", "layer2", "layer3", "layer4")
INIT_NAME = "init_encoder.safetensors"


def conv_weights(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's convolution weights (4-D tensors), fp32 on CPU, by state-dict key."""
    return {k: v.detach().float().cpu().clone() for k, v in encoder.state_dict().items() if v.ndim == 4}


def relative_change(initial: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, float]:
    """||W - W0|| / ||W0|| over the convolution weights, per stage and in total."""
    now = conv_weights(encoder)
    out: dict[str, float] = {}
    groups = {p: [k for k in initial if k.startswith(p)] for p in STAGE_PREFIXES}
    groups["total"] = list(initial)
    for name, keys in groups.items():
        d = sum(float((now[k] - initial[k]).pow(2).sum()) for k in keys)
        n = sum(float(initial[k].pow(2).sum()) for k in keys)
        out[name] = (d / n) ** 0.5 if n > 0 else 0.0
    return out


def load_or_save_initial(out: Path, encoder: nn.Module, fresh: bool) -> dict[str, torch.Tensor]:
    """The initial conv weights, saved beside the checkpoint at the start and read back on resume."""
    path = out / INIT_NAME
    if fresh or not path.is_file():
        w = conv_weights(encoder)
        save_file({k: v.contiguous() for k, v in w.items()}, str(path))
        return w
    return load_file(str(path))


@dataclass
class KnnMonitor:
    """kNN accuracy of the current encoder on a small labeled held-out set (bank / query halves)."""

    bank: ArraySplit
    query: ArraySplit
    preprocessing: PreprocessConfig
    num_classes: int
    k: int = 20

    @classmethod
    def from_source(
        cls, source: str | Path, pp: PreprocessConfig, n: int = 1000, seed: int = 0
    ) -> KnnMonitor:
        """`n` bank + `n` query images, stratified, from the validation split of a labeled source (MedMNIST
        npz), or from all its images when it defines no splits (a labeled folder such as head CT: its labels
        are used only by this monitor, never by the training)."""

        splits = load_splits(source, pp)
        held = splits.get("val", splits.get("all"))
        if held is None or held.labels is None:
            raise DataError(f"the kNN monitor needs labeled images; {Path(source).name} has none")
        idx = stratified_subset(held.labels, min(2 * n, len(held)), seed)
        rng = np.random.default_rng(seed)
        idx = rng.permutation(idx)
        half = len(idx) // 2
        k = max(len(held.class_names), int(held.labels.max()) + 1)
        return cls(held.subset(np.sort(idx[:half])), held.subset(np.sort(idx[half:])), pp, k)

    @torch.no_grad()
    def measure(self, encoder: ResNet50) -> dict[str, Any]:

        y_bank, y_query = labels_of(self.bank), labels_of(self.query)
        was_training = encoder.training
        t0 = time.perf_counter()
        try:
            fb = extract_features(encoder, self.bank.images, self.preprocessing)
            fq = extract_features(encoder, self.query.images, self.preprocessing)
        finally:
            encoder.train(was_training)
        m = knn_eval(fb, y_bank, fq, y_query, self.num_classes, self.k)
        return {
            "knn_accuracy": m["accuracy"],
            "knn_auc": m["auc"],
            "knn_f1": m["f1"],
            "majority_accuracy": m["majority_accuracy"],
            "collapse_std": collapse_std(fq),
            "monitor_s": time.perf_counter() - t0,
        }


class MonitorLog:
    """monitor.csv, appended across resumes; one row per check."""

    def __init__(self, out: Path, fresh: bool) -> None:
        self.path = out / "monitor.csv"
        self.fresh = fresh or not self.path.is_file()
        self._columns: list[str] | None = None
        if not self.fresh:
            with open(self.path, newline="") as fh:
                self._columns = next(csv.reader(fh), None)

    def write(self, row: dict[str, Any]) -> None:
        if self._columns is None:
            self._columns = list(row)
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(self._columns)
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c, "")) for c in self._columns])


def _fmt(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def read_monitor(path: str | Path) -> list[dict[str, float]]:
    """monitor.csv rows as floats (for plots and cards)."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]
