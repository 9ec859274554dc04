"""Class activation maps for the GAP + linear head, Grad-CAM for comparison, overlays, cross-method agreement.

For logits y_c = sum_k w_ck * mean_ij A_k(i,j) + b_c, Grad-CAM's channel weights are
alpha_k = mean_ij dy_c/dA_k(i,j) = w_ck / (H*W), so Grad-CAM = ReLU(sum_k alpha_k A_k) = CAM / (H*W):
the two are identical up to scale, and equal after normalization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctdata.heatmap import overlay  # the one map drawing (figures here, serving, pacs)
from cthub.errors import ConfigError
from hub.gradcam import stride16_grad_cam
from hub.resnet import ResNet50


def _last_features(model: ResNet50, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


def _normalize(maps: torch.Tensor) -> torch.Tensor:
    """Each map to [0, 1] by its own maximum (ReLU'd maps); all-zero maps stay zero."""
    flat = maps.flatten(1)
    top = flat.max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
    return maps / top


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _size(x: torch.Tensor) -> tuple[int, int]:
    """(H, W) of an image batch [B,C,H,W]."""
    return int(x.shape[-2]), int(x.shape[-1])


def _linear_head(model: ResNet50) -> torch.nn.Linear:
    """The classifier's linear head; ConfigError for an encoder without one."""
    if not isinstance(model.fc, torch.nn.Linear):
        raise ConfigError("CAM needs a classifier with a linear head (num_classes > 0)")
    return model.fc


def _targets(logits: torch.Tensor, target: int | list[int] | torch.Tensor | None) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    return t.expand(len(logits)) if t.numel() == 1 else t


@torch.no_grad()
def class_activation_map(
    model: ResNet50,
    x: torch.Tensor,
    target: int | list[int] | torch.Tensor | None = None,
    normalize: bool = True,
    upsample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [B,H,W] at input size in [0,1], target classes [B]) from the last stage's features.
    `target` None: the predicted class."""
    fc = _linear_head(model)
    model.eval()
    feats = _last_features(model, x).float()
    logits = model.forward_head(feats)
    t = _targets(logits, target)
    w = fc.weight.float()[t]  # [B, C]
    maps = F.relu(torch.einsum("bc,bchw->bhw", w, feats))
    if upsample:
        maps = _upsample(maps, _size(x))
    return (_normalize(maps) if normalize else maps), t


@torch.no_grad()
def stride16_cam(
    model: ResNet50,
    x: torch.Tensor,
    target: int | list[int] | torch.Tensor | None = None,
    normalize: bool = True,
    upsample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [B,H,W], target classes [B]): Grad-CAM at the stride-16 stage (S/16: 14x14 at 224 px), the maps
    the exported graph serves (`hub.gradcam`); `target` None: the predicted class."""
    fc = _linear_head(model)
    model.eval()
    a3 = model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    feats, cams = stride16_grad_cam(model, fc, a3.float())
    t = _targets(model.forward_head(feats), target)
    maps = F.relu(cams[torch.arange(len(t)), t])
    if upsample:
        maps = _upsample(maps, _size(x))
    return (_normalize(maps) if normalize else maps), t


def grad_cam(
    model: ResNet50,
    x: torch.Tensor,
    target: int | list[int] | torch.Tensor | None = None,
    normalize: bool = True,
    upsample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient-based Grad-CAM (Selvaraju et al.) on the last stage: weights = spatial mean of d y_c / d A."""
    model.eval()
    with torch.enable_grad():
        feats = _last_features(model, x).float().detach().requires_grad_(True)
        logits = model.forward_head(feats)
        t = _targets(logits.detach(), target)
        score = logits.gather(1, t[:, None]).sum()
        (grads,) = torch.autograd.grad(score, feats)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    maps = F.relu((alpha * feats.detach()).sum(1))
    if upsample:
        maps = _upsample(maps, _size(x))
    return (_normalize(maps) if normalize else maps), t


def save_overlays(
    unit_images: np.ndarray, maps: dict[str, np.ndarray], path: str | Path, titles: list[str] | None = None
) -> Path:
    """A grid PNG: one row per image, the image then one overlay per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, names = len(unit_images), list(maps)
    fig = Figure(figsize=(2.2 * (len(names) + 1), 2.2 * n))
    FigureCanvasAgg(fig)  # attaches itself: no pyplot, no global backend switch
    axes = fig.subplots(n, len(names) + 1, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(unit_images[i], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i] if titles else "image", fontsize=8)
        for j, m in enumerate(names):
            axes[i, j + 1].imshow(overlay(unit_images[i], maps[m][i]))
            axes[i, j + 1].set_title(m, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def map_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation per image between two stacks of maps [N,H,W] (NaN where a map is constant)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / den, np.nan)


def cross_method_correlation(maps: dict[str, np.ndarray]) -> dict[str, object]:
    """The paper's comparison: mean correlation of heatmaps of the same images, for every pair of methods."""
    names = list(maps)
    pairs = {}
    mat = np.eye(len(names))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            r = float(np.nanmean(map_correlation(maps[names[i]], maps[names[j]])))
            pairs[f"{names[i]} vs {names[j]}"] = r
            mat[i, j] = mat[j, i] = r
    return {
        "methods": names,
        "pairs": pairs,
        "matrix": mat.tolist(),
        "mean": float(np.mean(list(pairs.values()))) if pairs else float("nan"),
    }
