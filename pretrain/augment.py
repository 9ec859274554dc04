"""Batched, CT-appropriate augmentations as plain torch ops on unit-interval images [B,1,H,W].

Colour jitter and grayscale conversion have no meaning on CT; they become brightness/contrast and gamma
jitter of the grey values. No horizontal flip unless asked (laterality matters in CT). Every random draw
comes from the caller's `torch.Generator`, so a resumed run continues the same stream.
The output goes through `ctdata.preprocess.finalize` (the one normalization path) in `make_view`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctdata.preprocess import PreprocessConfig, finalize
from ctdata.warp import affine_resample


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view: output size, crop scale range and the probabilities of each transform."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    p_intensity: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    gamma: tuple[float, float] = (0.7, 1.5)
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # at 224 px; scaled with `size`
    p_solarize: float = 0.0
    p_hflip: float = 0.0


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def random_resized_crop(
    x: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """Per-sample random crop of `scale` area fraction and `ratio` aspect, resized to `size` (bilinear)."""
    b = x.shape[0]
    area = _uniform(b, *scale, g)
    logr = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), g)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the full width / height
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    # Antialias first when the crop is much larger than the output (large CT slices -> small views).
    src = x
    shrink = min(x.shape[-2], x.shape[-1]) * float(scale[0]) ** 0.5 / size
    if shrink > 2.0:
        new = (max(size, int(x.shape[-2] / shrink * 2)), max(size, int(x.shape[-1] / shrink * 2)))
        src = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
    return affine_resample(src, theta, size)


def intensity_jitter(x: torch.Tensor, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """With probability p: brightness shift, contrast around the image mean, gamma; clamped to [0,1]."""
    b = x.shape[0]
    apply = (torch.rand(b, generator=g) < spec.p_intensity).view(b, 1, 1, 1)
    shift = _uniform(b, -spec.brightness, spec.brightness, g).view(b, 1, 1, 1) * 0.5
    gain = _uniform(b, 1 - spec.contrast, 1 + spec.contrast, g).view(b, 1, 1, 1)
    gamma = torch.exp(_uniform(b, math.log(spec.gamma[0]), math.log(spec.gamma[1]), g)).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    y = ((x - mean) * gain + mean + shift).clamp(0.0, 1.0)
    y = y.clamp_min(1e-6).pow(gamma)
    return torch.where(apply, y, x)


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """With probability p a Gaussian blur, sigma drawn per sample (kernel ~10% of the image, odd)."""
    b, c, h, w = x.shape
    apply = torch.rand(b, generator=g) < p
    s = _uniform(b, *sigma, g) * (h / 224.0)
    if not bool(apply.any()):
        return x
    k = max(3, int(0.1 * h) // 2 * 2 + 1)
    t = torch.arange(k, dtype=x.dtype) - k // 2
    ker = torch.exp(-(t[None] ** 2) / (2 * s.clamp_min(1e-3)[:, None] ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # [B,k]
    xb = x.reshape(1, b * c, h, w)
    kh = ker.repeat_interleave(c, 0).view(b * c, 1, k, 1)
    kw = ker.repeat_interleave(c, 0).view(b * c, 1, 1, k)
    xb = F.pad(xb, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(F.conv2d(xb, kh, groups=b * c), kw, groups=b * c).view(b, c, h, w)
    return torch.where(apply.view(b, 1, 1, 1), y, x)


def solarize(x: torch.Tensor, p: float, g: torch.Generator, threshold: float = 0.5) -> torch.Tensor:
    b = x.shape[0]
    apply = (torch.rand(b, generator=g) < p).view(b, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1.0 - x, x)


def hflip(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    apply = (torch.rand(b, generator=g) < p).view(b, 1, 1, 1)
    return torch.where(apply, x.flip(-1), x) if p > 0 else x


def augment(unit: torch.Tensor, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """Unit-interval [B,1,H,W] -> augmented unit-interval [B,1,size,size]."""
    x = random_resized_crop(unit, spec.size, spec.scale, spec.ratio, g)
    x = hflip(x, spec.p_hflip, g)
    x = intensity_jitter(x, spec, g)
    x = gaussian_blur(x, spec.p_blur, spec.blur_sigma, g)
    if spec.p_solarize > 0:
        x = solarize(x, spec.p_solarize, g)
    return x.clamp(0.0, 1.0)


def make_view(unit: torch.Tensor, spec: ViewSpec, pp: PreprocessConfig, g: torch.Generator) -> torch.Tensor:
    """Augment, then normalize through the shared preprocessing path at the view's size."""
    return finalize(augment(unit, spec, g), pp.replace(input_size=spec.size))
