"""The config.json that travels with every model: architecture, provenance, labels and preprocessing."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctdata.preprocess import PreprocessConfig
from cthub.compat import known_fields
from cthub.errors import ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Everything needed to rebuild and use a model besides its weights."""

    name: str = "unnamed"
    architecture: str = "resnet50"
    method: str = "random"  # spark | mocov2 | swav | byol | supervised | random
    pretraining_data: str = "none"
    num_classes: int = 0  # 0: encoder only (pooled 2048-d features)
    labels: list[str] = field(default_factory=list)
    threshold: float | None = None  # binary operating point chosen on validation
    task: str | None = None
    revision: str | None = None
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # command, data, wall time, versions...
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From `to_dict`'s form. Keys this version does not know, at the top or in `preprocessing`, are
        ignored with a warning (cthub.compat) and their names kept in `provenance["unknown_config_keys"]`."""
        d, unknown = known_fields(cls, d, "model config")
        pp = d.get("preprocessing", {})
        if not isinstance(pp, PreprocessConfig):
            pp_known, pp_unknown = known_fields(PreprocessConfig, pp, "model config preprocessing")
            unknown += [f"preprocessing.{k}" for k in pp_unknown]
            d["preprocessing"] = PreprocessConfig.from_dict(pp_known)
        if unknown:
            d["provenance"] = {**d.get("provenance", {}), "unknown_config_keys": unknown}
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"invalid model config: {e}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        tmp = path.with_name(path.name + ".tmp")  # atomic: a reader never sees half a config
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / CONFIG_NAME
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None


def data_source(config: ModelConfig, override: str | Path | None = None) -> Path | None:
    """The labeled data the classifier was fine-tuned on: `override`, else its provenance's `data` when that
    file or folder exists here; None otherwise."""
    if override is not None:
        p = Path(override).expanduser()
        if not p.exists():
            raise ConfigError(f"--data {p} does not exist")
        return p
    recorded = config.provenance.get("data")
    if isinstance(recorded, str) and recorded:
        p = Path(recorded).expanduser()
        if p.exists():
            return p
        log.warning("the model's data %s is not on this machine: pass --data to check on it", recorded)
    return None
