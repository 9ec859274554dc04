"""`linear_probe`: frozen encoder features + logistic regression (C chosen on validation), test metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctdata.datasets import ArraySplit
from ctdata.preprocess import PreprocessConfig
from cthub.runtime import autocast, num_threads, resolve_amp, seed_everything, select_device
from finetune.metrics import choose_threshold, classification_metrics
from finetune.train import _inputs, resolve_encoder

log = logging.getLogger("finetune")


@torch.no_grad()
def extract_features(model: nn.Module, images: np.ndarray, pp: PreprocessConfig, *, batch_size: int = 256,
                     device: torch.device | None = None, amp: bool | None = None) -> np.ndarray:
    """Global-average-pooled last-stage features [N, 2048] (float32), encoder in eval mode."""
    device = device or next(model.parameters()).device
    model.eval()
    amp = resolve_amp(amp, device)
    out = []
    for s in range(0, len(images), batch_size):
        x = _inputs(images[s:s + batch_size], pp, None, None).to(device, memory_format=torch.channels_last)
        with autocast(device, amp):
            f = model.forward_features(x)[-1]
        out.append(f.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out)


def linear_probe(encoder: str | Path | nn.Module | None, train: ArraySplit, val: ArraySplit,
                 test: ArraySplit | None = None, *, image_size: int = 64, seed: int = 0,
                 cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0), threads: int | None = None,
                 device: str | None = None) -> dict[str, Any]:
    """Frozen-feature quality of an encoder: standardized features, multinomial logistic regression with
    the C that maximizes validation macro F1; returns val/test metrics (accuracy, auc, f1)."""
    seed_everything(seed)
    t0 = time.perf_counter()
    dev = select_device(device)
    k = max(len(train.class_names), int(train.labels.max()) + 1)
    with num_threads(threads):
        model, pp, name, _ = resolve_encoder(encoder, k, image_size)
        model = model.to(dev, memory_format=torch.channels_last)
        feats = {s: extract_features(model, d.images, pp, device=dev)
                 for s, d in (("train", train), ("val", val)) + ((("test", test),) if test is not None else ())}
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    z = {s: torch.from_numpy((f - mu) / sd) for s, f in feats.items()}
    best = None
    for c in cs:
        clf = fit_logreg(z["train"], torch.from_numpy(train.labels), k, c)
        vm = classification_metrics(val.labels, _proba(clf, z["val"]))
        if best is None or vm["f1"] > best[0]["f1"]:
            best = (vm, c, clf)
    assert best is not None
    vm, c, clf = best
    pv = _proba(clf, z["val"])
    thr = choose_threshold(val.labels, pv[:, 1]) if k == 2 else None
    out: dict[str, Any] = {"encoder": name, "method": "L2 logistic regression on standardized frozen GAP features",
                           "C": c, "image_size": image_size, "n_train": len(train),
                           "val": classification_metrics(val.labels, pv, thr), "threshold": thr}
    if test is not None:
        out["test"] = classification_metrics(test.labels, _proba(clf, z["test"]), thr)
        log.info("linear probe %s: test acc %.3f auc %.3f f1 %.3f (C=%g)", name, out["test"]["accuracy"],
                 out["test"]["auc"], out["test"]["f1"], c)
    out["wall_time_s"] = round(time.perf_counter() - t0, 1)
    return out


def fit_logreg(z: torch.Tensor, y: torch.Tensor, k: int, c: float, iters: int = 100) -> nn.Linear:
    """Multinomial logistic regression, L2 penalty 1/(2C) * ||W||^2 on the summed loss (scikit-learn's C),
    full-batch L-BFGS in torch (scikit-learn's lbfgs was pathologically slow beside torch's OpenMP here)."""
    torch.manual_seed(0)
    lin = nn.Linear(z.shape[1], k).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    zd, n = z.double(), len(z)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

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
