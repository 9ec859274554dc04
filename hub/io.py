"""save_pretrained / from_pretrained: safetensors + config.json + model card, verified on load."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cthub.errors import IntegrityError, ModelNotFoundError
from hub.card import write_card
from hub.config import WEIGHTS_NAME, ModelConfig
from hub.resnet import ResNet50

HUB_DIR_ENV = "CTHUB_HOME"
DEFAULT_HUB_DIR = Path.home() / ".cache" / "ct-ssl-hub"


def hub_dir(override: str | Path | None = None) -> Path:
    """The local hub directory: argument, else $CTHUB_HOME, else ~/.cache/ct-ssl-hub."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(HUB_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_HUB_DIR


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_model(cfg: ModelConfig) -> ResNet50:
    if cfg.architecture != "resnet50":
        raise ModelNotFoundError(f"unknown architecture {cfg.architecture!r} (only resnet50 is supported)")
    return ResNet50(num_classes=cfg.num_classes, in_chans=cfg.preprocessing.in_chans)


def save_pretrained(model: torch.nn.Module, directory: str | Path, config: ModelConfig) -> Path:
    """Write model.safetensors, config.json and README.md into `directory` (created if needed)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "architecture": config.architecture})
    os.replace(tmp, out / WEIGHTS_NAME)
    config.save(out)
    write_card(config, out)
    return out


def load_dir(directory: str | Path, *, sha256: str | None = None, num_classes: int | None = None,
             map_location: str | torch.device = "cpu") -> ResNet50:
    """Load a model folder strictly; `num_classes` replaces the head (0 drops it) for fine-tuning."""
    d = Path(directory)
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelNotFoundError(f"no {WEIGHTS_NAME} in {d}")
    if sha256 is not None and sha256_file(weights) != sha256:
        raise IntegrityError(f"{weights} does not match its recorded sha256; delete it and fetch it again")
    cfg = ModelConfig.load(d)
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise IntegrityError(f"{weights} is not a readable safetensors file ({e})") from None
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise IntegrityError(f"{weights}: key mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    if num_classes is not None and num_classes != cfg.num_classes:
        model.reset_classifier(num_classes)
        cfg.num_classes = num_classes
        cfg.labels = []
        cfg.threshold = None
    model.config = cfg  # type: ignore[attr-defined]
    return model.eval()


def from_pretrained(name_or_path: str | Path, *, num_classes: int | None = None,
                    hub_dir_override: str | Path | None = None) -> ResNet50:
    """Load a model by path or name (local hub directory). The model's `.config` carries preprocessing."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return load_dir(p, num_classes=num_classes)
    local = hub_dir(hub_dir_override) / str(name_or_path)
    if local.is_dir():
        return load_dir(local, num_classes=num_classes)
    raise ModelNotFoundError(f"model {str(name_or_path)!r} not found (looked at path {p} and hub dir {local})")
