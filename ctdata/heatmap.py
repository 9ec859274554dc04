"""A map over a slice: a class activation map scaled to [0, 1] (`heat`) and blended over a grey slice in a
colour map (`overlay`). One drawing for every place that shows a map: `finetune.cam`'s figures, the API's
`cam` PNG, the demo's viewer and the PACS overlay series."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def heat(cam: np.ndarray) -> np.ndarray:
    """A map -> heat in [0, 1]: ReLU, scaled by its maximum (an all-zero or empty map stays zero)."""
    h = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    top = float(h.max()) if h.size else 0.0
    return h / top if top > 0 else h


def overlay(unit_image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Grey image in [0,1] [H,W] + heat in [0,1] (any size, upsampled bilinearly) -> RGB uint8 [H,W,3]."""
    import matplotlib  # only where a map is drawn: importing ctdata stays light

    h, w = unit_image.shape
    hm = torch.as_tensor(heat, dtype=torch.float32)
    if hm.shape != (h, w):
        hm = F.interpolate(hm[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    colors = matplotlib.colormaps[cmap](hm.clamp(0, 1).numpy())[..., :3]
    grey = np.repeat(np.clip(unit_image, 0, 1)[..., None], 3, axis=2)
    return (255 * ((1 - alpha) * grey + alpha * colors)).round().astype(np.uint8)
