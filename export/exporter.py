"""Classifier -> ONNX (dynamic batch, config + checksum in metadata), checked against torch on real inputs."""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctdata.preprocess import PreprocessConfig, prepare
from cthub.errors import ConfigError, IntegrityError, ModelNotFoundError
from export.classifier import Classifier, loaded_sha256, model_config
from export.session import INPUT_NAME, META_PREFIX, OUTPUT_NAME, OnnxClassifier, read_metadata
from hub.config import WEIGHTS_NAME, ModelConfig
from hub.io import load_dir, sha256_file

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-3
# Real CT slices shipped inside the pydicom wheel (no download): a 128² CT and two 512² JPEG 2000 CTs.
PYDICOM_SAMPLES: tuple[str, ...] = ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm")


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime reproduces torch."""

    path: str
    opset: int
    source_sha256: str
    max_abs_diff: float
    tolerance: float
    parity_inputs: list[str]
    batch_sizes: list[int]
    providers: list[str]
    seconds: float
    size_mb: float
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff < self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}

    def summary(self) -> str:
        return (
            f"wrote {self.path} ({self.size_mb:.1f} MB, opset {self.opset}); parity torch vs ONNX "
            f"Runtime [{', '.join(self.providers)}] on {len(self.parity_inputs)} real inputs, batch "
            f"sizes {self.batch_sizes}: max |Δ logits| = {self.max_abs_diff:.2e} "
            f"(tolerance {self.tolerance:g})"
        )


def sample_sources(extra: Sequence[str | Path] = ()) -> list[Path]:
    """Parity inputs: the user's files, then the real CT DICOMs bundled with pydicom."""
    from pydicom.data import get_testdata_file

    out = [Path(p) for p in extra]
    for name in PYDICOM_SAMPLES:
        try:
            p = get_testdata_file(name, download=False)
        except Exception:  # noqa: BLE001 -- pydicom raises when a file is neither bundled nor cached
            p = None
        if p:
            out.append(Path(p))
    return out


def parity_batch(cfg: PreprocessConfig, sources: Sequence[Path]) -> tuple[torch.Tensor, list[str]]:
    """Preprocess every readable source with the model's own preprocessing into one batch."""
    tensors, names = [], []
    for src in sources:
        try:
            tensors.append(prepare(src, cfg))
            names.append(src.name)
        except Exception as e:  # noqa: BLE001 -- a sample that cannot be decoded here is skipped, not fatal
            log.warning("parity: skipping %s (%s)", src.name, e)
    if not tensors:
        raise ConfigError("no parity input could be prepared; pass real images with --sample")
    return torch.stack(tensors), names


def check_parity(
    model: torch.nn.Module, clf: Classifier, x: torch.Tensor, tolerance: float = PARITY_TOLERANCE
) -> tuple[float, list[int]]:
    """Max |torch - ORT| over logits, for the whole batch and for a single item (dynamic batch)."""
    model = model.eval().float()
    diffs, sizes = [], []
    for batch in (x, x[:1]):
        with torch.inference_mode():
            ref = model(batch).float().numpy()
        got = clf.logits(batch)
        if got.shape != ref.shape:
            raise IntegrityError(f"ONNX output shape {got.shape} differs from torch {ref.shape}")
        diffs.append(float(np.max(np.abs(got - ref))))
        sizes.append(int(batch.shape[0]))
    worst = max(diffs)
    if not worst < tolerance:
        raise IntegrityError(
            f"ONNX parity check failed: max |Δ logits| = {worst:.3e} >= {tolerance:g} between torch and "
            f"ONNX Runtime; the exported file is not trustworthy"
        )
    return worst, sizes


def export_onnx(
    model_dir: str | Path,
    out: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    samples: Sequence[str | Path] = (),
    tolerance: float = PARITY_TOLERANCE,
) -> ExportReport:
    """Export `model_dir` (safetensors + config.json) to ONNX and verify it against torch."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelNotFoundError(f"no {WEIGHTS_NAME} in {model_dir}")
    model = load_dir(model_dir).float().eval()
    cfg = model_config(model)
    if cfg.num_classes <= 0:
        raise ConfigError(f"{model_dir} holds an encoder without a classification head; fine-tune it first")
    source_sha = loaded_sha256(cfg)  # hashed and verified once, while loading
    pp = cfg.preprocessing
    path = Path(out) if out is not None else model_dir / ONNX_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    dummy = torch.zeros(1, pp.in_chans, pp.input_size, pp.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation; onnxscript is not installed here
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    _write_metadata(tmp, cfg.to_dict(), source_sha, opset)
    tmp.replace(path)
    clf = OnnxClassifier(path)
    x, names = parity_batch(pp, sample_sources(samples))
    try:
        worst, sizes = check_parity(model, clf, x, tolerance)
    except IntegrityError:
        path.unlink(missing_ok=True)  # never leave a file that failed its check where serving would use it
        raise
    return ExportReport(
        path=str(path),
        opset=opset,
        source_sha256=source_sha,
        max_abs_diff=worst,
        tolerance=tolerance,
        parity_inputs=names,
        batch_sizes=sizes,
        providers=clf.providers,
        seconds=round(time.perf_counter() - t0, 2),
        size_mb=round(path.stat().st_size / 2**20, 2),
    )


def _write_metadata(path: Path, config: dict[str, Any], source_sha: str, opset: int) -> None:
    import onnx

    model = onnx.load(str(path))
    props = {
        "config": config,
        "preprocessing": config["preprocessing"],
        "labels": config.get("labels", []),
        "source_sha256": source_sha,
        "source_file": WEIGHTS_NAME,
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": opset},
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, json.dumps(value, sort_keys=True)
    model.producer_name = "ct-ssl-hub"
    model.doc_string = (
        f"{config.get('name', 'model')}: {config.get('architecture')} classifier, input "
        "[batch, C, S, S] normalized by the 'cthub.preprocessing' metadata; output logits."
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def matches_source(metadata: dict[str, Any], config: ModelConfig, weights_sha256: str) -> bool:
    """True when ONNX metadata names these weights and carries this config's preprocessing."""
    return (
        metadata.get("preprocessing") == config.preprocessing.to_dict()
        and metadata.get("source_sha256") == weights_sha256
    )


def onnx_is_fresh(model_dir: str | Path, onnx_path: str | Path | None = None) -> bool:
    """True when model.onnx exists, was exported from the current model.safetensors and carries the same
    preprocessing as the current config.json."""
    model_dir = Path(model_dir)
    path = Path(onnx_path) if onnx_path else model_dir / ONNX_NAME
    weights = model_dir / WEIGHTS_NAME
    if not path.is_file() or not weights.is_file():
        return False
    try:
        meta = read_metadata(path)
        config = ModelConfig.load(model_dir)
    except Exception:  # noqa: BLE001 -- an unreadable ONNX file or config is simply not fresh
        return False
    return matches_source(meta, config, sha256_file(weights))
