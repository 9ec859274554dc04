"""int8: static quantization (QDQ, per-channel weights) of an exported classifier, calibrated on real training
images of its own data and accepted only when it stays within tolerance of fp32 on the test split.

Only the backbone is quantized: the nodes downstream of the last-stage feature map (global pooling, the
linear head, softmax) stay fp32, so probabilities and embeddings are computed in fp32 from int8 features.
The class activation maps are Grad-CAM back through layer4 (`hub.gradcam`), so that backward pass runs on
the int8 graph too (their correlation with the fp32 maps is reported as `cam_correlation`).
The stem (the 7x7 convolution on the input) stays fp32
too: on this AVX2 CPU without VNNI, ONNX Runtime's u8s8 kernels saturate their 16-bit pair sums there
(measured on a 64 px OrganAMNIST demo model: top-1 agreement with fp32 0.67 with the stem in int8 against
0.79 for the same QDQ graph run with optimizations off, i.e. in float; 0.79 in both once the stem is
fp32). The remaining disagreement is quantization noise on close calls of briefly trained models (ΔAUC and
ΔF1 stay within 0.003 there); the tolerance is checked on ΔAUC (and optionally ΔF1 / agreement).

Dynamic quantization is not offered: for this CNN it was measured several times slower than fp32 (it
re-quantizes activations at run time and keeps convolutions in float). The model is first pre-processed
(`quant_pre_process`: shape inference and graph optimization).
"""

from __future__ import annotations

import datetime as _dt
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cthub.errors import ConfigError, ToleranceError
from export.classifier import softmax
from export.data import ModelData, batches, load_model_data
from export.defaults import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_EVAL_IMAGES,
    DEFAULT_MAX_AUC_DROP,
    DEFAULT_OOD_IMAGES,
    DEFAULT_QUANTILE,
)
from export.exporter import (
    CHUNK,
    build_ood,
    classifier_outputs,
    record_in_card,
    tool_versions,
    write_metadata,
)
from export.integrity import ONNX_NAME, int8_path, record_onnx
from export.session import INPUT_NAME, OnnxClassifier, read_metadata, weights_sha256
from hub.config import ModelConfig, data_source
from hub.metrics import classification_metrics

log = logging.getLogger(__name__)

ACTIVATION_TYPES = ("uint8", "int8")
QUANT_FORMATS = ("qdq", "qoperator")


@dataclass(frozen=True)
class Int8Tolerance:
    """How far int8 may fall behind fp32 on the test split before the file is refused (None: unchecked).
    Drops are fp32 minus int8, so a negative value demands that int8 be better."""

    max_auc_drop: float = DEFAULT_MAX_AUC_DROP
    max_f1_drop: float | None = None
    min_agreement: float | None = None

    def violations(self, delta_auc: float, delta_f1: float, agreement: float) -> list[str]:
        """One line per exceeded tolerance (empty when int8 is acceptable)."""
        out = []
        if not -delta_auc <= self.max_auc_drop:  # also catches a NaN AUC
            out.append(f"AUC dropped by {-delta_auc:.4f} (allowed {self.max_auc_drop:g})")
        if self.max_f1_drop is not None and not -delta_f1 <= self.max_f1_drop:
            out.append(f"F1 dropped by {-delta_f1:.4f} (allowed {self.max_f1_drop:g})")
        if self.min_agreement is not None and not agreement >= self.min_agreement:
            out.append(f"top-1 agreement with fp32 {agreement:.4f} (required {self.min_agreement:g})")
        return out


@dataclass(frozen=True)
class QuantSettings:
    """How the int8 file is made (onnxruntime.quantization.quantize_static arguments)."""

    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    per_channel: bool = True
    reduce_range: bool = False
    activation_type: str = "uint8"
    calibrate_method: str = "minmax"
    keep_head_fp32: bool = True
    keep_stem_fp32: bool = True  # the 7x7 input convolution (~3% of the FLOPs): see the module doc
    quant_format: str = "qdq"  # QOperator (QLinearConv...) only for comparison: QDQ is what ORT optimizes

    def __post_init__(self) -> None:
        if self.calibration_images < 1:
            raise ConfigError("calibration_images must be >= 1")
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibrate_method must be one of {', '.join(CALIBRATION_METHODS)}")
        if self.activation_type not in ACTIVATION_TYPES:
            raise ConfigError(f"activation_type must be one of {', '.join(ACTIVATION_TYPES)}")
        if self.quant_format not in QUANT_FORMATS:
            raise ConfigError(f"quant_format must be one of {', '.join(QUANT_FORMATS)}")


@dataclass
class Int8Report:
    """What `quantize_int8` measured (and wrote, when `passed`)."""

    path: str
    onnx_sha256: str | None
    source_sha256: str
    data: str
    calibration_images: int
    eval_images: int
    fp32: dict[str, float]
    int8: dict[str, float]
    delta_auc: float
    delta_f1: float
    top1_agreement: float
    agreement_baseline: float  # what always predicting fp32's commonest class would agree on
    max_abs_diff_logits: float
    cam_correlation: float
    tolerance: dict[str, Any]
    violations: list[str]
    settings: dict[str, Any]
    excluded_nodes: int
    providers: list[str]
    seconds: float
    size_mb: float | None
    ood: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}

    def card_entry(self) -> dict[str, Any]:
        keys = ("source_sha256", "data", "calibration_images", "eval_images", "fp32", "int8", "delta_auc")
        extra = (
            "delta_f1",
            "top1_agreement",
            "agreement_baseline",
            "max_abs_diff_logits",
            "cam_correlation",
            "tolerance",
        )
        out = {k: getattr(self, k) for k in (*keys, *extra)}
        return {"file": Path(self.path).name, "sha256": self.onnx_sha256, **out, "settings": self.settings}

    def summary(self) -> str:
        verdict = "wrote" if self.passed else "REFUSED"
        return (
            f"{verdict} {self.path}"
            + (f" ({self.size_mb:.1f} MB)" if self.size_mb else "")
            + f": int8 vs fp32 on {self.eval_images} test images of {self.data}: AUC "
            f"{self.fp32['auc']:.4f} -> {self.int8['auc']:.4f} (Δ {self.delta_auc:+.4f}), F1 "
            f"{self.fp32['f1']:.4f} -> {self.int8['f1']:.4f} (Δ {self.delta_f1:+.4f}), top-1 agreement "
            f"{self.top1_agreement:.4f} (a constant model: {self.agreement_baseline:.4f}); calibrated on "
            f"{self.calibration_images} training images"
            + (f"; {'; '.join(self.violations)}" if self.violations else "")
        )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def head_nodes(model: Any) -> list[str]:
    """Names of the nodes downstream of the last-stage feature map (the input of the `cam` convolution):
    pooling, linear head, softmax and the CAM convolution, which stay fp32."""
    producer = {out: node for node in model.graph.node for out in node.output}
    if "cam" not in producer:
        raise ConfigError("the model has no `cam` output: re-export it with `cthub export`")
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, None] = {}
    stack = [producer["cam"].input[0]]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name not in found:
                found[node.name] = None
                stack.extend(node.output)
    return list(found)


def _reader(images: np.ndarray, pp: Any, batch: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Calibration(CalibrationDataReader):
        """Real training images, `batch` at a time, as the session input."""

        def __init__(self) -> None:
            self.batches = batches(images, pp, batch)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {INPUT_NAME: x}

    return Calibration()


def quantize_file(
    fp32_path: Path, out: Path, images: np.ndarray, pp: Any, settings: QuantSettings, workdir: Path
) -> int:
    """Pre-process, calibrate on `images` and write the QDQ int8 model to `out`; the number of nodes kept
    in fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = workdir / "pre.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32_path), str(pre))
    graph = onnx.load(str(pre))
    excluded = head_nodes(graph) if settings.keep_head_fp32 else []
    if settings.keep_stem_fp32:
        excluded += [n.name for n in graph.graph.node if INPUT_NAME in n.input and n.op_type == "Conv"]
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[settings.calibrate_method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(pre),
            str(out),
            _reader(images, pp, CHUNK),  # MinMax keeps only per-pass minima and maxima: small memory
            quant_format=QuantFormat.QDQ if settings.quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=QuantType.QUInt8 if settings.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=method,
            calibration_providers=["CPUExecutionProvider"],
        )
    return len(excluded)


def _metrics(
    y: np.ndarray, logits: np.ndarray, threshold: float | None, temperature: float
) -> dict[str, float]:
    """Metrics of the served (calibrated) probabilities: a binary threshold applies to softmax(logits / T)."""
    m = classification_metrics(y, softmax(logits.astype(np.float64) / temperature), threshold)
    return {k: round(float(m[k]), 6) for k in ("accuracy", "auc", "f1")}


def _map_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Pearson correlation over images of two stacks of maps [N, h, w] (constant maps skipped)."""
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    x, y = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    den = np.sqrt((x**2).sum(1) * (y**2).sum(1))
    ok = den > 0
    return float(np.mean((x * y).sum(1)[ok] / den[ok])) if ok.any() else float("nan")


def compare(
    fp32: OnnxClassifier, int8: OnnxClassifier, data: ModelData, n: int, threshold: float | None
) -> dict[str, Any]:
    """int8 against fp32 on up to `n` test images: metrics of both, deltas, agreement, map correlation."""
    test = data.take("test", n)
    assert test.labels is not None
    ref = classifier_outputs(fp32, batches(test.images, data.preprocessing, CHUNK))
    got = classifier_outputs(int8, batches(test.images, data.preprocessing, CHUNK))
    t = fp32.temperature
    m32, m8 = _metrics(test.labels, ref.logits, threshold, t), _metrics(test.labels, got.logits, threshold, t)
    top = ref.logits.argmax(1)
    idx = np.arange(len(top))
    return {
        "eval_images": len(test),
        "fp32": m32,
        "int8": m8,
        "delta_auc": round(m8["auc"] - m32["auc"], 6),
        "delta_f1": round(m8["f1"] - m32["f1"], 6),
        "top1_agreement": float((got.logits.argmax(1) == top).mean()),
        # what a constant model agrees on: the share of fp32's most frequent prediction
        "agreement_baseline": float(np.bincount(top).max() / len(top)),
        "max_abs_diff_logits": float(np.abs(got.logits - ref.logits).max()),
        "cam_correlation": _map_correlation(ref.cam[idx, top], got.cam[idx, top]),
    }


def quantize_int8(
    model_dir: str | Path,
    fp32_path: str | Path | None = None,
    out: str | Path | None = None,
    *,
    data: str | Path | None = None,
    settings: QuantSettings | None = None,
    eval_images: int = DEFAULT_EVAL_IMAGES,
    tolerance: Int8Tolerance | None = None,
    ood_images: int = DEFAULT_OOD_IMAGES,
    ood_quantile: float = DEFAULT_QUANTILE,
    threads: int | None = None,
) -> Int8Report:
    """Quantize the model folder's verified fp32 export to int8 (`model.int8.onnx` beside it), calibrated on
    its training images and checked on its test images; ToleranceError (nothing written) beyond
    `tolerance`, ConfigError without the classifier's data."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    settings = settings or QuantSettings()
    tolerance = tolerance or Int8Tolerance()
    config = ModelConfig.load(model_dir)
    src = Path(fp32_path) if fp32_path is not None else model_dir / ONNX_NAME
    fp32 = OnnxClassifier(src, config=config, source_sha256=weights_sha256(model_dir), threads=threads)
    source = data_source(config, data)
    if source is None:
        raise ConfigError(
            "int8 calibration and its accuracy check need the classifier's own labeled data, which its "
            "config does not name or this machine does not have: pass --data FILE"
        )
    own = load_model_data(config, source)
    path = Path(out) if out is not None else int8_path(src)
    calib = own.take("train", settings.calibration_images, seed=1)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        work = Path(tmp)
        excluded = quantize_file(src, work / "int8.onnx", calib.images, own.preprocessing, settings, work)
        int8 = OnnxClassifier(work / "int8.onnx", verify=False, config=config, threads=threads)
        measured = compare(fp32, int8, own, eval_images, config.threshold)
        bad = tolerance.violations(measured["delta_auc"], measured["delta_f1"], measured["top1_agreement"])
        report = Int8Report(
            path=str(path),
            onnx_sha256=None,
            source_sha256=fp32.sha256,
            data=Path(own.source).name,
            calibration_images=len(calib),
            tolerance=asdict(tolerance),
            violations=bad,
            settings=asdict(settings) | {"format": settings.quant_format.upper(), "weight_type": "int8"},
            excluded_nodes=excluded,
            providers=int8.providers,
            seconds=0.0,
            size_mb=None,
            **measured,
        )
        if bad:
            raise ToleranceError(f"int8 model refused, nothing written: {report.summary()}")
        ood = build_ood(int8, own, ood_images, ood_quantile) if ood_images > 0 else None
        entry = {k: v for k, v in report.card_entry().items() if k != "sha256"}
        meta = read_metadata(src) | {"variant": "int8", "quantization": entry, "exported_at": _now()}
        meta["exporter"] = dict(meta.get("exporter", {})) | tool_versions()
        meta.pop("parity", None)
        meta.pop("ood", None)
        if ood is not None:
            meta["ood"] = ood.to_metadata()
        write_metadata(work / "int8.onnx", meta, f"{config.name} (int8 QDQ, per-channel weights)")
        (work / "int8.onnx").replace(path)
    report.onnx_sha256 = record_onnx(path)
    report.size_mb = round(path.stat().st_size / 2**20, 2)
    report.ood = ood.summary() if ood is not None else None
    report.seconds = round(time.perf_counter() - t0, 2)
    record_in_card(model_dir, path, "int8", report.card_entry() | {"ood": report.ood})
    return report
