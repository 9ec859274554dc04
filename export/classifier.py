"""One inference interface for exported and native classifiers.

`Classifier` turns preprocessed inputs [B, C, S, S] into logits, probabilities, class activation maps and
embeddings (`outputs`), scores how far an embedding lies from the training data (`ood_score`), and carries
the model's identity (config, weights sha256, backend, providers) and calibration. The probabilities are
calibrated: softmax(logits / T) with the temperature T of `calibration` (an ONNX file's `cthub.calibration`
metadata, a torch model's `config.metrics["calibration"]`; T = 1 and "uncalibrated" without one); the logits
stay raw. Its input check and softmax live here,
once; an implementation only runs a checked float32 batch. `OnnxClassifier` (export.session) runs an
exported ONNX file with ONNX Runtime; `TorchClassifier` runs the safetensors weights with torch.

The class activation maps are Grad-CAM at the stride-16 stage (layer3), for every class, before ReLU and
upsampling: cam[b, k] = sum_c alpha[b, k, c] A3[b, c] with alpha the spatial mean of d logit_k / d A3
([B, K, S/16, S/16]: 14x14 at 224 px, where the last stage's map is 7x7 and 2x2 at 64 px). The gradient is
computed inside the graph (`hub.gradcam`) and equals torch autograd's (`hub.gradcam.reference_grad_cam`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cthub.errors import ConfigError, ShapeError
from cthub.runtime import select_device
from export.metadata import calibration_of, ood_reference_of, served_calibration
from export.ood import POOLED_STAGES, AnyOodReference, stage_features
from hub.config import ModelConfig
from hub.gradcam import stride16_grad_cam
from hub.io import load_dir
from hub.resnet import ResNet50


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in the dtype of `logits` (numerically stable)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def model_config(model: torch.nn.Module) -> ModelConfig:
    """The ModelConfig that `hub.io.load_dir` attaches to a loaded model."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ConfigError("the model carries no ModelConfig: load it with hub.io.load_dir")
    return cfg


def loaded_sha256(config: ModelConfig) -> str:
    """The weights' sha256 that `hub.io.load_dir` verified while loading (recorded in the provenance)."""
    loaded = config.provenance.get("loaded")
    if not isinstance(loaded, dict) or not loaded.get("sha256"):
        raise ConfigError("the model was not loaded through hub.io.load_dir: its weights' sha256 is unknown")
    return str(loaded["sha256"])


def class_labels(config: ModelConfig, num_classes: int) -> list[str]:
    """The configured labels when there is one per output, else class_0..class_{n-1}."""
    labels = list(config.labels)
    return labels if len(labels) == num_classes else [f"class_{i}" for i in range(num_classes)]


@dataclass(frozen=True)
class InferenceOutputs:
    """Everything one forward pass gives for a batch of B inputs and K classes."""

    logits: np.ndarray  # [B, K] float32, raw
    probabilities: np.ndarray  # [B, K] float64, softmax(logits / T): calibrated
    cam: np.ndarray | None  # [B, K, h, w] float32, Grad-CAM of every class at stride 16 (h = w = S/16);
    # None when the pass was asked for no maps (`outputs(x, maps=False)`)
    embedding: np.ndarray  # [B, D] float32, globally pooled last-stage features
    stage_pool: np.ndarray | None = None  # [B, 256+512+1024] float32, pooled layers 1-3 (the OOD score's);
    # None from a graph version 2 file

    def ood_features(self) -> dict[str, np.ndarray]:
        """The pooled features of each stage the out-of-distribution score reads (`export.ood`)."""
        return stage_features(self.stage_pool, self.embedding)


RunOutputs = tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]


def pooled_stages(model: ResNet50, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(globally pooled layers 1-3 concatenated [B, 256+512+1024], layer3's map [B, 1024, S/16, S/16])."""
    maps = model.forward_intermediates(x, indices=list(range(len(POOLED_STAGES))), intermediates_only=True)
    return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1), maps[-1]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy()


class CamHead(torch.nn.Module):
    """A ResNet50 classifier giving logits, probabilities, cam, embedding and stage_pool (the exported
    graph, version 3: `export.defaults.GRAPH_VERSION`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        fc = getattr(model, "fc", None)
        if not isinstance(model, ResNet50) or not isinstance(fc, torch.nn.Linear):
            raise ConfigError("class activation maps need a ResNet50 with a linear head (num_classes > 0)")
        self.model: ResNet50 = model
        self.fc: torch.nn.Linear = fc

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        stage_pool, a3 = pooled_stages(self.model, x)  # a3: stride 16
        feats, cam = stride16_grad_cam(self.model, self.fc, a3)
        embedding = self.model.forward_head(feats, pre_logits=True)
        logits = self.fc(embedding)
        return logits, torch.softmax(logits, dim=1), cam, embedding, stage_pool


class Classifier(ABC):
    """Probabilities, maps and embeddings for a batch of preprocessed inputs, plus the model's identity.

    Subclasses set `config`, `sha256` (of the source weights), `providers`, `input_shape` [C, S, S],
    `num_classes` and optionally `ood` (the out-of-distribution reference), and implement `_run` (logits)
    and `_run_outputs` (logits, cam or None, embedding, stage_pool or None) on a batch already checked and
    converted to float32.
    """

    backend: ClassVar[str]
    config: ModelConfig
    sha256: str
    providers: list[str]
    input_shape: tuple[int, int, int]
    num_classes: int
    ood: AnyOodReference | None = None

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Logits [B, num_classes] for a C-contiguous float32 batch of the expected shape."""

    @abstractmethod
    def _run_outputs(self, batch: np.ndarray, maps: bool) -> RunOutputs:
        """(logits [B, K], cam [B, K, h, w] or None without `maps`, embedding [B, D], stage_pool [B, 1792]
        or None from a graph without it) as float32 for a checked batch. Without `maps` the Grad-CAM nodes
        are not run at all (they cost more than the forward pass at 224 px with many classes:
        docs/results/bench-224px.md)."""

    @property
    def labels(self) -> list[str]:
        return class_labels(self.config, self.num_classes)

    @property
    def calibration(self) -> dict[str, Any]:
        """The calibration in use: an exported file's own (`cthub.calibration` in its metadata, covered by
        its sha256), else the config's record; T = 1 and status "uncalibrated" without one."""
        metadata = getattr(self, "metadata", None)  # OnnxClassifier: what the verified file says
        if isinstance(metadata, dict):
            return calibration_of(metadata)
        return served_calibration(self.config.metrics.get("calibration"))

    @property
    def temperature(self) -> float:
        """T of softmax(logits / T)."""
        return float(self.calibration["temperature"])

    @property
    def identity(self) -> dict[str, Any]:
        """What a response names the model by: {name, version, sha256, backend, providers}."""
        return {
            "name": self.config.name,
            "version": self.config.revision or self.sha256[:12],
            "sha256": self.sha256,
            "backend": self.backend,
            "providers": list(self.providers),
        }

    def _checked(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Inputs [B, C, S, S] (or one [C, S, S]) as a C-contiguous float32 batch; ShapeError otherwise."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"expected input [B, {', '.join(map(str, self.input_shape))}], got {tuple(arr.shape)}"
            )
        return np.ascontiguousarray(arr, dtype=np.float32)

    def logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw logits [B, num_classes] for inputs [B, C, S, S] (or one [C, S, S])."""
        return self._run(self._checked(x))

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Calibrated class probabilities [B, num_classes] as float64: softmax(logits / T)."""
        return softmax(self.logits(x).astype(np.float64) / self.temperature)

    __call__ = predict_proba

    def outputs(self, x: np.ndarray | torch.Tensor, maps: bool = True) -> InferenceOutputs:
        """Raw logits, calibrated float64 probabilities, class activation maps (None without `maps`) and
        embeddings in one pass."""
        logits, cam, embedding, stage_pool = self._run_outputs(self._checked(x), maps)
        probs = softmax(logits.astype(np.float64) / self.temperature)
        return InferenceOutputs(logits, probs, cam, embedding, stage_pool)

    @property
    def ood_threshold(self) -> float | None:
        """Scores above this are out of distribution; None when the model carries no reference."""
        return None if self.ood is None else self.ood.threshold

    def ood_score(self, outputs: InferenceOutputs) -> np.ndarray:
        """Out-of-distribution scores [B] of a pass's outputs (the pooled stage features; see export.ood);
        ConfigError without a reference (check `ood_threshold is None` first)."""
        if self.ood is None:
            raise ConfigError(
                f"{self.config.name} has no out-of-distribution reference: re-export it with its training "
                "data (`cthub export MODEL_DIR --data FILE`)"
            )
        return self.ood.score_stages(outputs.ood_features())

    def torch_module(self) -> torch.nn.Module | None:
        """The torch model behind this classifier, when it is one."""
        return None


class TorchClassifier(Classifier):
    """A classifier folder's safetensors weights run with torch (CUDA when available)."""

    backend: ClassVar[str] = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        sha256: str,
        device: torch.device | None = None,
        ood: AnyOodReference | None = None,
    ) -> None:
        if config.num_classes <= 0:
            raise ConfigError(f"{config.name} is an encoder without a classification head")
        self.device = device or next(model.parameters()).device
        self.module = model.to(self.device).float().eval()
        self.head = CamHead(self.module)
        self.config, self.sha256, self.ood = config, sha256, ood
        self.providers = [f"torch:{self.device.type}"]
        pp = config.preprocessing
        self.input_shape = (pp.in_chans, pp.input_size, pp.input_size)
        self.num_classes = config.num_classes

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        *,
        sha256: str | None = None,
        device: torch.device | None = None,
        ood: bool = True,
    ) -> TorchClassifier:
        """Load a model folder strictly; its weights are hashed once, while loading, and verified. With `ood`
        the out-of-distribution reference comes from the folder's model.onnx when that is verified and
        exported from these weights (else the classifier has none)."""
        model = load_dir(model_dir, sha256=sha256)
        cfg = model_config(model)
        sha = loaded_sha256(cfg)
        reference = ood_reference_of(Path(model_dir), sha, cfg) if ood else None
        return cls(model, cfg, sha, device or select_device(), reference)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(batch).to(self.device))
        return out.float().cpu().numpy()

    def _run_outputs(self, batch: np.ndarray, maps: bool) -> RunOutputs:
        x = torch.from_numpy(batch).to(self.device)
        with torch.inference_mode():
            if not maps:
                net = self.head.model
                stage_pool, a3 = pooled_stages(net, x)
                embedding = net.forward_head(net.layer4(a3), pre_logits=True)
                return _numpy(self.head.fc(embedding)), None, _numpy(embedding), _numpy(stage_pool)
            logits, _, cam, embedding, stage_pool = self.head(x)
        return _numpy(logits), _numpy(cam), _numpy(embedding), _numpy(stage_pool)

    def torch_module(self) -> torch.nn.Module:
        return self.module
