"""The one preprocessing path shared by pretraining, fine-tuning, export checks and serving.

    source (DICOM bytes/path, PNG/JPEG, array)
      -> intensities (HU for CT DICOM; 0..255 grey for ordinary images)
      -> unit interval [0, 1] (`intensities_to_unit`): HU by the configured mapping (interval, per-slice
         min-max, or a window), grey divided by 255
      -> resize with antialiasing to the model's input size
      -> grey replicated to the model's channel count
      -> (x - mean) / std

The configuration travels with the weights (`config.json["preprocessing"]`) so training and serving cannot
drift apart. Images that are not HU (PNG, RGB secondary captures, MedMNIST arrays) are taken as already
mapped: their 0..255 grey is divided by 255 whatever the mapping says. Stored datasets and pretraining
shards keep the unit image as uint8 (`unit_to_uint8`, round(255 x)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from cthub.compat import known_fields
from cthub.errors import ConfigError, ShapeError

if TYPE_CHECKING:
    from ctdata.dicom import CTImage

# (center, width) in HU. Brain 35/80 is the seed paper's brain-hemorrhage window.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (35.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 150.0),
    "bone": (400.0, 1800.0),
}
MAPPINGS = ("interval", "minmax", "window")
INTENSITY_FIELDS = ("mapping", "hu_range", "window", "window_center", "window_width")
PRETRAIN_HU_RANGE: tuple[float, float] = (-1024.0, 3071.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw intensities become a model input. Stored in every model's config.json."""

    mapping: str = "interval"
    hu_range: tuple[float, float] = PRETRAIN_HU_RANGE
    window: str | None = None
    window_center: float | None = None
    window_width: float | None = None
    input_size: int = 224
    in_chans: int = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise ConfigError(
                f"unknown intensity mapping {self.mapping!r}; choose one of {', '.join(MAPPINGS)}"
            )
        if self.mapping == "window":
            self.window_bounds()  # validates
        if self.input_size < 8:
            raise ConfigError(f"input_size must be at least 8 pixels, got {self.input_size}")
        if self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if len(self.mean) not in (1, self.in_chans) or len(self.std) not in (1, self.in_chans):
            raise ConfigError("mean/std need one value or one per channel")
        if any(s <= 0 for s in self.std):
            raise ConfigError("std values must be positive")

    def window_bounds(self) -> tuple[float, float]:
        """(low, high) HU of the configured window (preset name or explicit center/width)."""
        if self.window_center is not None and self.window_width is not None:
            c, w = float(self.window_center), float(self.window_width)
        elif self.window is not None:
            if self.window not in WINDOW_PRESETS:
                raise ConfigError(
                    f"unknown window preset {self.window!r}; presets: {', '.join(sorted(WINDOW_PRESETS))}"
                )
            c, w = WINDOW_PRESETS[self.window]
        else:
            raise ConfigError("mapping 'window' needs a preset name or window_center and window_width")
        if w <= 0:
            raise ConfigError(f"window width must be positive, got {w}")
        return c - w / 2.0, c + w / 2.0

    def replace(self, **changes: Any) -> PreprocessConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hu_range"] = list(self.hu_range)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """From `to_dict`'s form; unknown keys are ignored with a warning (cthub.compat)."""
        kw, _ = known_fields(cls, d, "preprocessing")
        for k in ("hu_range", "mean", "std"):
            if k in kw:
                kw[k] = tuple(float(v) for v in kw[k])
        return cls(**kw)

    @classmethod
    def for_window(cls, preset: str, **kw: Any) -> PreprocessConfig:
        return cls(mapping="window", window=preset, **kw)

    def with_intensity_of(self, other: PreprocessConfig) -> PreprocessConfig:
        """This config with `other`'s HU -> grey mapping (mapping, HU range, window): a classifier keeps
        its encoder's size and normalization but maps HU the way its own training images were made."""
        return self.replace(**{k: getattr(other, k) for k in INTENSITY_FIELDS})


def hu_to_unit(hu: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Map HU to [0, 1] by the configured mapping (float32, same shape)."""
    hu = np.asarray(hu, dtype=np.float32)
    if cfg.mapping == "interval":
        lo, hi = cfg.hu_range
    elif cfg.mapping == "window":
        lo, hi = cfg.window_bounds()
    else:  # minmax: each slice (last two axes) to its own range
        lo = hu.min(axis=(-2, -1), keepdims=True)
        hi = hu.max(axis=(-2, -1), keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        return np.clip((hu - lo) / span, 0.0, 1.0).astype(np.float32)
    out = np.subtract(hu, np.float32(lo), dtype=np.float32)  # one new array, then in place
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def grey_to_unit(grey: np.ndarray, peak: float | None = None) -> np.ndarray:
    """Already-mapped grey images to [0, 1], dividing by `peak` when given.

    Without `peak` the scale comes from the array: uint8 0..255, uint16 0..65535, float 0..1 (or 0..255 when
    any value exceeds 1), for arrays of unknown convention such as the ones `prepare` receives.
    """
    grey = np.asarray(grey)
    if peak is not None:
        return np.clip(grey.astype(np.float32) / np.float32(peak), 0.0, 1.0)
    if grey.dtype == np.uint8:
        return grey.astype(np.float32) / 255.0
    if grey.dtype == np.uint16:
        return grey.astype(np.float32) / 65535.0
    out = grey.astype(np.float32)
    if out.size and float(out.max()) > 1.0:
        out = out / 255.0
    return np.clip(out, 0.0, 1.0)


def finalize(unit: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """[B,1,H,W] (or [1,H,W], [H,W]) in [0,1] -> normalized [B,C,S,S] float32 model input."""
    x = unit
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ShapeError(f"expected a grey image batch [B,1,H,W], got shape {tuple(unit.shape)}")
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    x = resize_unit(x.float(), cfg.input_size)
    if cfg.in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(_per_channel(cfg.mean, cfg.in_chans), dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(_per_channel(cfg.std, cfg.in_chans), dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def resize_unit(x: torch.Tensor, size: int) -> torch.Tensor:
    """THE resize of the pipeline: [B,1,H,W] in [0,1] -> [B,1,size,size], bilinear with antialiasing, clamped.

    `finalize` (serving) and dataset storage (`ctdata.datasets`) both call this, so stored training images
    and served images are resized identically.
    """
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0)


def _per_channel(v: Sequence[float], n: int) -> list[float]:
    return list(v) * n if len(v) == 1 else list(v)


def intensities_to_unit(pixels: np.ndarray, is_hu: bool, cfg: PreprocessConfig) -> np.ndarray:
    """Loaded intensities (a slice or a stack [S,H,W]) to [0, 1]: THE mapping step of the pipeline.

    HU go through the configured mapping; anything else is grey 0..255 (the convention of `CTImage` and
    `Series` pixels) divided by 255, so a nearly black picture stays nearly black.
    """
    return hu_to_unit(pixels, cfg) if is_hu else grey_to_unit(pixels, peak=255.0)


def unit_to_uint8(unit: torch.Tensor) -> np.ndarray:
    """THE storage quantization of datasets and shards: [0, 1] -> uint8 round(255 x)."""
    return (unit * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def to_unit(image: CTImage, cfg: PreprocessConfig) -> np.ndarray:
    """A loaded image's first frame in [0, 1] (`intensities_to_unit`)."""
    frame = image.pixels[0] if image.pixels.ndim == 3 else image.pixels
    return intensities_to_unit(frame, image.is_hu, cfg)


def prepare(source: bytes | str | Path | np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """Any supported source -> one normalized model input [C,S,S] (first frame of multi-frame data)."""
    from ctdata.io import load_image

    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise ShapeError(f"expected a 2-D slice, got array of shape {source.shape}")
        unit = grey_to_unit(source)
    else:
        unit = to_unit(load_image(source), cfg)
    return unit_to_input(unit, cfg)


def unit_to_input(unit: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """One [H,W] slice in [0,1] -> one normalized model input [C,S,S]."""
    return finalize(torch.from_numpy(np.ascontiguousarray(unit)), cfg)[0]


def prepare_batch(uint8_images: torch.Tensor | np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """Stored uint8 slices [B,H,W] or [B,1,H,W] (already mapped to 0..255) -> model inputs [B,C,S,S]."""
    x = torch.as_tensor(uint8_images)
    if x.ndim == 3:
        x = x[:, None]
    return finalize(x.float() / 255.0, cfg)
