"""`linear_probe`: frozen encoder features + logistic regression (C chosen on validation), test metrics."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctdata.datasets import ArraySplit
from ctdata.labeled import labels_of
from ctdata.preprocess import PreprocessConfig
from cthub.runtime import autocast, isolated_seed, num_threads, resolve_amp, select_device
from finetune.train import model_inputs, place_model, resolve_encoder
from hub.metrics import choose_threshold, classification_metrics
from hub.resnet import ResNet50

log = logging.getLogger(__name__)
BN_MODES = ("stored", "recalibrated")
# torch's public BatchNorm classes (their common base, `_BatchNorm`, is private)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def extract_features(
    model: ResNet50,
    images: np.ndarray,
    pp: PreprocessConfig,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    amp: bool | None = None,
) -> np.ndarray:
    """Global-average-pooled last-stage features [N, 2048] (float32), encoder in eval mode."""
    device = device or next(model.parameters()).device
    model.eval()
    amp = resolve_amp(amp, device)
    out = []
    for s in range(0, len(images), batch_size):
        x = model_inputs(images[s : s + batch_size], pp).to(device, memory_format=torch.channels_last)
        with autocast(device, amp):
            f = model.forward_features(x)
        out.append(f.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def recalibrate_bn(
    model: ResNet50,
    images: np.ndarray,
    pp: PreprocessConfig,
    *,
    n_images: int = 2048,
    batch_size: int = 64,
    seed: int = 0,
) -> ResNet50:
    """A copy of `model` whose BatchNorm running statistics are the exact averages over `n_images` clean
    images (cumulative average, no augmentation); weights untouched. Returns the copy in eval mode."""
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n_images])
    device = next(model.parameters()).device
    model.train()
    for s in range(0, len(idx), batch_size):
        chunk = idx[s : s + batch_size]
        if len(chunk) < 2:
            break
        x = model_inputs(images[chunk], pp).to(device, memory_format=torch.channels_last)
        model.forward_features(x)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def linear_probe(
    encoder: str | Path | nn.Module | None,
    train: ArraySplit,
    val: ArraySplit,
    test: ArraySplit | None = None,
    *,
    image_size: int = 64,
    seed: int = 0,
    cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0),
    threads: int | None = None,
    device: str | None = None,
    bn: str = "recalibrated",
    n_recalibrate: int = 2048,
) -> dict[str, Any]:
    """Frozen-feature quality of an encoder: standardized features, multinomial logistic regression with
    the C that maximizes validation macro F1; returns val/test metrics (accuracy, auc, f1).

    `bn="recalibrated"` (default) re-estimates BatchNorm statistics on `n_recalibrate` clean training images
    first, so a random-init encoder and a pretrained one are compared the same way (`finetune.evaluate`);
    `bn="stored"` uses the statistics the encoder carries."""
    t0 = time.perf_counter()
    dev = select_device(device)
    y_train, y_val = labels_of(train), labels_of(val)
    k = max(len(train.class_names), int(y_train.max()) + 1)
    splits = (("train", train), ("val", val)) + ((("test", test),) if test is not None else ())
    with num_threads(threads):
        with isolated_seed(seed):  # a random-init encoder (and the head) the same for every call
            model, pp, name, _ = resolve_encoder(encoder, k, image_size)
        model = place_model(model, dev, True)
        if bn == "recalibrated":
            model = recalibrate_bn(model, train.images, pp, n_images=n_recalibrate, seed=seed)
        elif bn != "stored":
            raise ValueError(f"bn must be 'recalibrated' or 'stored', got {bn!r}")
        feats = {s: extract_features(model, d.images, pp, device=dev) for s, d in splits}
    y_test = labels_of(test) if test is not None else None
    out = linear_probe_on_features(feats, y_train, y_val, y_test, k, cs)
    out.update({"encoder": name, "image_size": image_size, "bn": bn})
    if test is not None:
        log.info(
            "linear probe %s (BN %s): test acc %.3f auc %.3f f1 %.3f (C=%g)",
            name,
            bn,
            out["test"]["accuracy"],
            out["test"]["auc"],
            out["test"]["f1"],
            out["C"],
        )
    out["wall_time_s"] = round(time.perf_counter() - t0, 1)
    return out


def linear_probe_on_features(
    feats: dict[str, np.ndarray],
    y_train: np.ndarray,
    y_val: np.ndarray,
    y_test: np.ndarray | None,
    k: int,
    cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0),
) -> dict[str, Any]:
    """Logistic regression on standardized features {'train','val'[,'test']}; C chosen on val macro F1."""
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    z = {s: torch.from_numpy((f - mu) / sd) for s, f in feats.items()}
    best = None
    for c in cs:
        clf = fit_logreg(z["train"], torch.from_numpy(np.asarray(y_train, dtype=np.int64)), k, c)
        vm = classification_metrics(y_val, _proba(clf, z["val"]))
        if best is None or vm["f1"] > best[0]["f1"]:
            best = (vm, c, clf)
    assert best is not None
    _, c, clf = best
    pv = _proba(clf, z["val"])
    thr = choose_threshold(y_val, pv[:, 1]) if k == 2 else None
    out: dict[str, Any] = {
        "method": "L2 logistic regression on standardized frozen GAP features",
        "C": c,
        "n_train": len(y_train),
        "val": classification_metrics(y_val, pv, thr),
        "threshold": thr,
    }
    if y_test is not None and "test" in z:
        out["test"] = classification_metrics(y_test, _proba(clf, z["test"]), thr)
    return out


def fit_logreg(z: torch.Tensor, y: torch.Tensor, k: int, c: float, iters: int = 100) -> nn.Linear:
    """Multinomial logistic regression, L2 penalty 1/(2C) * ||W||^2 on the summed loss (scikit-learn's C),
    full-batch L-BFGS in torch (scikit-learn's lbfgs was pathologically slow beside torch's OpenMP here)."""
    lin = nn.utils.skip_init(nn.Linear, z.shape[1], k, dtype=torch.float64)  # no random init: zeros below
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    zd, n = z.double(), len(z)
    opt = torch.optim.LBFGS(
        lin.parameters(), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(zd), y, reduction="sum") / n + lin.weight.pow(2).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lin


@torch.no_grad()
def _proba(lin: nn.Linear, z: torch.Tensor) -> np.ndarray:
    return torch.softmax(lin(z.double()), dim=1).numpy()
