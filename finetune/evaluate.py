"""Frozen-feature evaluation of an encoder: weighted kNN, linear probe, a feature-collapse statistic, and
BatchNorm treated the same way for every encoder.

Why BN matters here: a freshly initialised ResNet50 keeps running mean 0 / variance 1, so in eval mode every
BN is an identity and a "random" encoder is an un-normalised random ReLU network, while every trained encoder
carries data-fitted statistics. Comparing the two as stored compares BN conventions, not features.
`recalibrate_bn` re-estimates the statistics of any encoder on clean unlabeled images of the target data
(no weights change), and `evaluate_encoder` reports both views side by side.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctdata.datasets import ArraySplit
from ctdata.labeled import labels_of
from cthub.runtime import num_threads
from finetune.probe import BN_MODES, extract_features, linear_probe_on_features, recalibrate_bn
from finetune.train import num_classes_of, place_model, resolve_encoder
from hub.metrics import classification_metrics

log = logging.getLogger(__name__)


def collapse_std(features: np.ndarray) -> float:
    """Mean per-dimension std of L2-normalized embeddings, times sqrt(d): ~1 for well-spread features,
    -> 0 when every image maps to (nearly) the same direction (SimSiam's collapse monitor)."""
    z = F.normalize(torch.from_numpy(np.asarray(features, dtype=np.float32)), dim=1)
    return float(z.std(dim=0).mean() * z.shape[1] ** 0.5)


def knn_scores(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    query: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """Class scores [Q, K] of a cosine-similarity kNN with exp(sim / T) weighted votes (the monitor of
    InstDisc / solo-learn), normalized to sum to 1 per query."""
    b = F.normalize(torch.from_numpy(np.asarray(bank, dtype=np.float32)), dim=1)
    q = F.normalize(torch.from_numpy(np.asarray(query, dtype=np.float32)), dim=1)
    labels = torch.from_numpy(np.asarray(bank_labels, dtype=np.int64))
    k = min(k, len(b))
    out = torch.zeros(len(q), num_classes, dtype=torch.float64)
    for s in range(0, len(q), 1024):
        sim, idx = (q[s : s + 1024] @ b.T).topk(k, dim=1)
        w = (sim.double() / temperature).exp()
        out[s : s + 1024].scatter_add_(1, labels[idx], w)
    return (out / out.sum(1, keepdim=True).clamp_min(1e-300)).numpy()


def majority_accuracy(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent training class: the floor a useful model must beat."""
    major = np.bincount(np.asarray(train_labels, dtype=np.int64)).argmax()
    return float((np.asarray(test_labels) == major).mean())


def knn_eval(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    query: np.ndarray,
    query_labels: np.ndarray,
    num_classes: int,
    k: int = 20,
) -> dict[str, Any]:
    """kNN metrics (accuracy, macro AUC, macro F1) of `query` against a labeled `bank`, with the
    majority-class accuracy beside them."""
    m = classification_metrics(query_labels, knn_scores(bank, bank_labels, query, num_classes, k))
    m.pop("confusion_matrix", None)
    m["k"] = k
    m["majority_accuracy"] = majority_accuracy(bank_labels, query_labels)
    return m


def evaluate_encoder(
    encoder: Any,
    train: ArraySplit,
    val: ArraySplit,
    test: ArraySplit,
    *,
    unlabeled: np.ndarray | None = None,
    image_size: int = 64,
    k: int = 20,
    bn_modes: tuple[str, ...] = BN_MODES,
    n_recalibrate: int = 2048,
    probe: bool = True,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Offline frozen-feature evaluation: for each BN mode, kNN (bank = train, queries = test), the linear
    probe (C chosen on val) and the collapse statistic of the test features. `unlabeled` (default: the
    train images) are the clean images BN statistics are re-estimated on."""
    t0 = time.perf_counter()
    k_cls = num_classes_of(train)
    y_train, y_test = labels_of(train), labels_of(test)
    y_val = labels_of(val) if probe else None  # only the probe uses val (to choose C)
    out: dict[str, Any] = {
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "image_size": image_size,
        "majority_accuracy": majority_accuracy(y_train, y_test),
    }
    with num_threads(threads):
        model, pp, name, _ = resolve_encoder(encoder, k_cls, image_size)
        model = place_model(model.eval(), next(model.parameters()).device, True)
        out["encoder"] = name
        for mode in bn_modes:
            if mode not in BN_MODES:
                raise ValueError(f"bn mode {mode!r}: choose from {BN_MODES}")
            m = model
            if mode == "recalibrated":
                src = unlabeled if unlabeled is not None else train.images
                m = recalibrate_bn(model, src, pp, n_images=n_recalibrate, seed=seed)
            feats = {
                s: extract_features(m, d.images, pp)
                for s, d in (("train", train), ("val", val), ("test", test))
            }
            res: dict[str, Any] = {
                "knn": knn_eval(feats["train"], y_train, feats["test"], y_test, k_cls, k),
                "collapse_std": collapse_std(feats["test"]),
            }
            if y_val is not None:
                res["linear_probe"] = linear_probe_on_features(feats, y_train, y_val, y_test, k_cls)
            out[mode] = res
    out["wall_time_s"] = round(time.perf_counter() - t0, 1)
    return out
