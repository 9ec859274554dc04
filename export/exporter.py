"""Classifier -> ONNX with five outputs (logits, probabilities, cam, embedding, stage_pool), dynamic batch,
metadata, a sha256 sidecar, an out-of-distribution reference (`export.ood.LayeredOodReference`), and a
parity check against torch on real images of the classifier's own data (written into the model card)."""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cthub.errors import (
    ConfigError,
    CTHubError,
    IntegrityError,
    ModelNotFoundError,
    StaleModelError,
    ToleranceError,
)
from export.classifier import CamHead, Classifier, loaded_sha256, model_config
from export.data import ModelData, batches, load_model_data, prepare_files, pydicom_sources
from export.defaults import (
    DEFAULT_OOD_FOLDS,
    DEFAULT_OOD_IMAGES,
    DEFAULT_OPSET,
    DEFAULT_PARITY_IMAGES,
    DEFAULT_QUANTILE,
    EXPORTERS,
    GRAPH_VERSION,
    PARITY_TOLERANCE,
)
from export.integrity import ONNX_NAME, check_fresh, record_onnx
from export.metadata import CALIBRATION_KEY, served_calibration
from export.ood import LayeredOodReference, stage_features
from export.session import INPUT_NAME, META_PREFIX, OUTPUT_NAMES, OnnxClassifier, read_metadata
from hub.config import WEIGHTS_NAME, ModelConfig, data_source
from hub.io import load_dir, record_metrics, sha256_file

log = logging.getLogger(__name__)

# fp32 parity, torch vs ONNX Runtime: max |Δ| <= atol + PARITY_RTOL * max |torch output|, else the file is
# not written; atol is PARITY_TOLERANCE (on logits, in export.defaults). Float32 sums over 2048 channels and
# 50 layers differ by about 1e-6 of the outputs' scale (not of each element's own value), and a briefly
# trained model can have logits in the hundreds: the scale term keeps such models exportable. The goal
# (max |Δ logits| < PARITY_GOAL) is reported beside.
PARITY_RTOL = 1e-5
PARITY_GOAL = 1e-4
CAM_TOLERANCE = 1e-3  # atol on the class activation maps
# ... plus this share of the largest |cam|. The maps are Grad-CAM, sum_c alpha_c A3_c over 1,024 channels of
# both signs: the sum is far smaller than its terms, so the two engines' float32 rounding (1e-6 to 1e-5 on the
# logits) grows to 0.8-2.4% of the map's peak on trained models (measured, ONNX Runtime vs torch: 0.83% and
# 2.4% on short 64 px OrganAMNIST fine-tunes, 0.86% on a 128 px head CT one; in torch, this graph's maps and
# autograd's agree to 1e-6). Shown after ReLU and division by the peak, 5% is ~13 of 256 colour steps.
CAM_RTOL = 5e-2
CHUNK = 16  # images per forward pass in the checks (bounded memory at 224 px)
OUTPUT_DOCS: dict[str, str] = {
    "logits": "[batch, K] raw class scores",
    "probabilities": "[batch, K] softmax of the logits",
    "cam": "[batch, K, S/16, S/16] Grad-CAM of every class at the stride-16 stage (layer3), before ReLU and "
    "upsampling: sum_c alpha[k, c] * A3[c], alpha = spatial mean of d logit_k / d A3 (computed in the graph)",
    "embedding": "[batch, 2048] globally pooled last-stage features (layer4; out-of-distribution scoring)",
    "stage_pool": "[batch, 256+512+1024] globally pooled outputs of layers 1, 2 and 3, concatenated "
    "(out-of-distribution scoring: 'cthub.ood')",
}


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime reproduces torch on real images."""

    path: str
    opset: int
    exporter: str
    source_sha256: str
    onnx_sha256: str
    max_abs_diff: float  # logits
    max_abs_diff_cam: float
    max_abs_diff_embedding: float
    max_abs_logit: float
    max_abs_cam: float
    top1_agreement: float
    parity_images: int
    parity_inputs: list[str]
    tolerance: float
    batch_sizes: list[int]
    providers: list[str]
    export_seconds: float
    seconds: float
    size_mb: float
    ood: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def goal_met(self) -> bool:
        """max |Δ logits| below the fp32 goal (PARITY_GOAL), whatever the logits' scale."""
        return self.max_abs_diff < PARITY_GOAL

    @property
    def passed(self) -> bool:
        """Within tolerance (also relative to the logits' scale, see PARITY_RTOL)."""
        return self.max_abs_diff <= self.tolerance + PARITY_RTOL * self.max_abs_logit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed, "goal_met": self.goal_met}

    def card_entry(self) -> dict[str, Any]:
        """The figures the model card shows for this export."""
        return {
            "file": Path(self.path).name,
            "sha256": self.onnx_sha256,
            "source_sha256": self.source_sha256,
            "opset": self.opset,
            "exporter": self.exporter,
            "parity": {
                "images": self.parity_images,
                "inputs": self.parity_inputs,
                "max_abs_diff_logits": self.max_abs_diff,
                "max_abs_diff_cam": self.max_abs_diff_cam,
                "max_abs_diff_embedding": self.max_abs_diff_embedding,
                "max_abs_logit": self.max_abs_logit,
                "max_abs_cam": self.max_abs_cam,
                "top1_agreement": self.top1_agreement,
                "goal_max_abs_diff_logits": PARITY_GOAL,
                "providers": self.providers,
            },
            "ood": self.ood,
        }

    def summary(self) -> str:
        ood = (
            f"; OOD threshold {self.ood['threshold']:.4f} ({self.ood['method']}, {self.ood['n_reference']} "
            "reference images)"
            if self.ood
            else "; no OOD reference (no training data)"
        )
        return (
            f"wrote {self.path} ({self.size_mb:.1f} MB, opset {self.opset}, {self.exporter} exporter, sha256 "
            f"{self.onnx_sha256[:12]}...); parity torch vs ONNX Runtime [{', '.join(self.providers)}] on "
            f"{self.parity_images} real images ({'; '.join(self.parity_inputs)}), batch sizes "
            f"{self.batch_sizes}: max |Δ logits| = {self.max_abs_diff:.2e} (tolerance {self.tolerance:g} + "
            f"{PARITY_RTOL:g}·{self.max_abs_logit:.3g}; goal < {PARITY_GOAL:g} "
            f"{'met' if self.goal_met else 'missed'}), "
            f"max |Δ cam| = {self.max_abs_diff_cam:.2e}, top-1 agreement {self.top1_agreement:.4f}{ood}"
        )


@dataclass
class Outputs:
    """Stacked outputs of one engine over the check images."""

    logits: np.ndarray
    cam: np.ndarray
    embedding: np.ndarray
    stage_pool: np.ndarray


def _stack(parts: Sequence[tuple[np.ndarray, ...]]) -> Outputs:
    return Outputs(*(np.concatenate([p[i] for p in parts]) for i in range(4)))


def torch_outputs(model: torch.nn.Module, inputs: Iterable[np.ndarray]) -> Outputs:
    """(logits, cam, embedding, stage_pool) of the torch model over batches of inputs."""
    head = CamHead(model.eval().float())
    parts = []
    with torch.inference_mode():
        for x in inputs:
            logits, _, cam, emb, pool = head(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            parts.append((logits.numpy(), cam.numpy(), emb.numpy(), pool.numpy()))
    return _stack(parts)


def classifier_outputs(clf: Classifier, inputs: Iterable[np.ndarray]) -> Outputs:
    """(logits, cam, embedding, stage_pool) of a Classifier over batches of inputs."""
    parts = []
    for x in inputs:
        o = clf.outputs(x, maps=True)
        if o.stage_pool is None:
            raise ConfigError(f"{clf.config.name}'s graph has no stage_pool output: re-export it")
        assert o.cam is not None  # asked for
        parts.append((o.logits, o.cam, o.embedding, o.stage_pool))
    return _stack(parts)


def within(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float = PARITY_RTOL) -> bool:
    """max |got - ref| <= atol + rtol * max |ref| (False for NaN): relative to the outputs' scale."""
    return bool(np.max(np.abs(got - ref)) <= atol + rtol * np.max(np.abs(ref)))


def check_parity(
    model: torch.nn.Module, clf: Classifier, x: torch.Tensor, tolerance: float = PARITY_TOLERANCE
) -> tuple[float, list[int]]:
    """Max |torch - ONNX Runtime| over logits, for the whole batch and for a single item (dynamic batch);
    ToleranceError (an IntegrityError) beyond `tolerance` (+ PARITY_RTOL relative)."""
    model = model.eval().float()
    diffs, sizes, ok = [], [], True
    for batch in (x, x[:1]):
        with torch.inference_mode():
            ref = model(batch).float().numpy()
        got = clf.logits(batch)
        if got.shape != ref.shape:
            raise IntegrityError(f"ONNX output shape {got.shape} differs from torch {ref.shape}")
        diffs.append(float(np.max(np.abs(got - ref))))
        sizes.append(int(batch.shape[0]))
        ok = ok and within(got, ref, tolerance)
    worst = max(diffs)
    if not ok:
        raise ToleranceError(
            f"ONNX parity check failed: max |Δ logits| = {worst:.3e} >= {tolerance:g} between torch and "
            f"ONNX Runtime; the exported file is not trustworthy"
        )
    return worst, sizes


def _parity_inputs(
    model_cfg: ModelConfig, data: ModelData | None, samples: Sequence[str | Path], n: int
) -> tuple[list[np.ndarray], list[str]]:
    """Batches of real model inputs: the classifier's own test images, then the given files and the CT
    DICOMs bundled with pydicom; with a description of each source."""
    pp = model_cfg.preprocessing
    chunks: list[np.ndarray] = []
    names: list[str] = []
    if data is not None and n > 0:
        test = data.take("test", n)
        chunks += list(batches(test.images, pp, CHUNK))
        names.append(data.describe("test", len(test)))
    files, file_names = prepare_files(pp, pydicom_sources(samples))
    if files is not None:
        chunks.append(files.numpy())
        names += file_names
    if not chunks:
        raise ConfigError("no parity input could be prepared; pass real images with --sample or --data")
    return chunks, names


def parity(
    model: torch.nn.Module, clf: Classifier, inputs: list[np.ndarray], tolerance: float
) -> dict[str, Any]:
    """Torch vs the exported classifier on every input (and one input alone): max |Δ| of logits, cam and
    embedding, top-1 agreement; ToleranceError when logits or cam differ beyond tolerance, or top-1 differs
    on an image whose top-2 margin exceeds the measured error."""
    ref, got = torch_outputs(model, inputs), classifier_outputs(clf, inputs)
    single = clf.logits(inputs[0][:1])
    if got.logits.shape != ref.logits.shape or got.cam.shape != ref.cam.shape:
        raise ToleranceError(f"ONNX output shapes {got.cam.shape} differ from torch {ref.cam.shape}")
    d_logits = max(float(np.abs(got.logits - ref.logits).max()), float(np.abs(single - ref.logits[:1]).max()))
    d_cam = float(np.abs(got.cam - ref.cam).max())
    d_emb = float(np.abs(got.embedding - ref.embedding).max())
    d_pool = float(np.abs(got.stage_pool - ref.stage_pool).max())
    same = got.logits.argmax(1) == ref.logits.argmax(1)
    top2 = np.sort(ref.logits, axis=1)[:, -2:]
    unexplained = int(np.sum(~same & (top2[:, 1] - top2[:, 0] > 2 * d_logits)))
    cam_atol = max(CAM_TOLERANCE, tolerance)
    close = within(got.logits, ref.logits, tolerance) and within(single, ref.logits[:1], tolerance)
    if not (close and within(got.cam, ref.cam, cam_atol, rtol=CAM_RTOL) and unexplained == 0):
        raise ToleranceError(
            f"ONNX parity check failed: max |Δ logits| = {d_logits:.3e} (tolerance {tolerance:g} + "
            f"{PARITY_RTOL:g}·max|logit|), max |Δ cam| = {d_cam:.3e} (tolerance {cam_atol:g} + "
            f"{CAM_RTOL:g}·max|cam|, max|cam| = {float(np.abs(ref.cam).max()):.3g}), top-1 differs on "
            f"{int((~same).sum())} of {len(same)} images; the exported file is not trustworthy"
        )
    return {
        "max_abs_diff_logits": d_logits,
        "max_abs_diff_cam": d_cam,
        "max_abs_diff_embedding": d_emb,
        "max_abs_diff_stage_pool": d_pool,
        "top1_agreement": float(same.mean()),
        "max_abs_logit": float(np.abs(ref.logits).max()),
        "max_abs_cam": float(np.abs(ref.cam).max()),
        "images": len(same),
        "batch_sizes": [int(inputs[0].shape[0]), 1],
    }


def stage_features_of(clf: Classifier, images: np.ndarray, pp: Any) -> dict[str, np.ndarray]:
    """Pooled features of each ResNet stage {layer1..layer4: [N, C]} of stored uint8 images through the
    classifier (its graph without the map nodes)."""
    parts = [clf.outputs(x, maps=False) for x in batches(images, pp, CHUNK)]
    if any(o.stage_pool is None for o in parts):
        raise ConfigError(f"{clf.config.name}'s graph has no stage_pool output: re-export it")
    pool = np.concatenate([o.stage_pool for o in parts if o.stage_pool is not None])
    return stage_features(pool, np.concatenate([o.embedding for o in parts]))


def build_ood(
    clf: Classifier,
    data: ModelData,
    n: int,
    quantile: float = DEFAULT_QUANTILE,
    seed: int = 0,
    folds: int = DEFAULT_OOD_FOLDS,
) -> LayeredOodReference:
    """The OOD reference (`export.ood.LayeredOodReference`): a probabilistic PCA per stage of up to `n`
    training images; z-scores and the threshold (`quantile`) from held-out scores: up to `n` validation
    images and the training images cross-fitted in `folds` folds."""
    train, val = data.take("train", n, seed), data.take("val", n, seed)
    info = {
        "data": Path(data.source).name,
        "reference_split": "train",
        "threshold_split": f"val + train cross-fitted in {folds} folds" if folds > 1 else "val",
    }
    return LayeredOodReference.build(
        stage_features_of(clf, train.images, data.preprocessing),
        stage_features_of(clf, val.images, data.preprocessing),
        quantile=quantile,
        folds=folds,
        seed=seed,
        info=info,
    )


def torch_to_onnx(module: torch.nn.Module, dummy: torch.Tensor, path: Path, opset: int, exporter: str) -> str:
    """Write `module` (input [batch, C, S, S], the OUTPUT_NAMES) to `path`; returns the exporter used."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        log.warning("onnxscript is not installed: using the TorchScript exporter (pip install onnxscript)")
        exporter = "torchscript"
    names = list(OUTPUT_NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of torch.export / the TorchScript exporter
        if exporter == "dynamo":
            # The maintained exporter (torch.export + onnxscript). Measured here (ResNet50, 64 px, one busy
            # core): 18-35 s per export against 6 s for TorchScript, spent in torch.export's tracing and
            # decompositions; the same parity (~2e-5 on logits), 125 nodes against 171 (TorchScript adds
            # Identity nodes), the same ONNX Runtime speed once the session has optimized the graph.
            torch.onnx.export(
                module,
                (dummy,),
                str(path),
                dynamo=True,
                external_data=False,  # one self-contained file: its sha256 covers every weight
                input_names=[INPUT_NAME],
                output_names=names,
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                optimize=True,
                verbose=False,
            )
        else:
            torch.onnx.export(
                module,
                (dummy,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes={INPUT_NAME: {0: "batch"}} | {n: {0: "batch"} for n in names},
                opset_version=opset,
                do_constant_folding=True,
            )
    return exporter


def tool_versions() -> dict[str, str]:
    """Versions of the tools that made (and check) an export."""
    import onnx

    from cthub import __version__

    out = {"ct-ssl-hub": __version__, "torch": torch.__version__, "onnx": onnx.__version__}
    for name in ("onnxruntime", "onnxscript"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            continue
    return out


def base_metadata(cfg: ModelConfig, source_sha: str, opset: int, exporter: str) -> dict[str, Any]:
    """The metadata every exported variant carries."""
    return {
        "config": cfg.to_dict(),
        "preprocessing": cfg.preprocessing.to_dict(),
        "labels": list(cfg.labels),
        "threshold": cfg.threshold,
        "source_name": cfg.name,
        "source_sha256": source_sha,
        "source_file": WEIGHTS_NAME,
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exporter": {"method": exporter, "opset": opset, **tool_versions()},
        "outputs": OUTPUT_DOCS,
        "graph_version": GRAPH_VERSION,
        "variant": "fp32",
        CALIBRATION_KEY: served_calibration(cfg.metrics.get("calibration")),  # serving's T (export.metadata)
    }


def write_metadata(path: Path, props: dict[str, Any], doc: str) -> None:
    """Replace the `cthub.*` metadata of an ONNX file (JSON values), check it, save it in place."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, json.dumps(value, sort_keys=True)
    model.producer_name = "ct-ssl-hub"
    model.doc_string = doc
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _doc(cfg: ModelConfig, variant: str) -> str:
    return (
        f"{cfg.name} ({variant}): {cfg.architecture} classifier, input [batch, C, S, S] normalized by the "
        "'cthub.preprocessing' metadata; outputs logits, probabilities, cam, embedding, stage_pool "
        "('cthub.outputs')."
    )


def record_in_card(model_dir: Path, path: Path, variant: str, entry: dict[str, Any]) -> None:
    """Add an export's figures to the model folder's config metrics and card (files inside the folder)."""
    if path.resolve().parent != model_dir.resolve():
        return
    current = ModelConfig.load(model_dir).metrics.get("onnx")
    merged = dict(current) if isinstance(current, dict) else {}
    merged[variant] = entry
    record_metrics(model_dir, {"onnx": merged})


def export_onnx(
    model_dir: str | Path,
    out: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    samples: Sequence[str | Path] = (),
    tolerance: float = PARITY_TOLERANCE,
    exporter: str = "dynamo",
    data: str | Path | None = None,
    parity_images: int = DEFAULT_PARITY_IMAGES,
    ood_images: int = DEFAULT_OOD_IMAGES,
    ood_quantile: float = DEFAULT_QUANTILE,
    threads: int | None = None,
) -> ExportReport:
    """Export `model_dir` (safetensors + config.json) to ONNX, check it against torch on real images of the
    classifier's own data (`data`, else its provenance; else pydicom's CT DICOMs), add the OOD reference,
    record its sha256 (sidecar, hub manifest) and the figures in the model card."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS_NAME).is_file():
        raise ModelNotFoundError(f"no {WEIGHTS_NAME} in {model_dir}")
    model = load_dir(model_dir).float().eval()
    cfg = model_config(model)
    if cfg.num_classes <= 0:
        raise ConfigError(f"{model_dir} holds an encoder without a classification head; fine-tune it first")
    source_sha = loaded_sha256(cfg)  # hashed and verified once, while loading
    source = data_source(cfg, data)
    own = load_model_data(cfg, source) if source is not None else None
    pp = cfg.preprocessing
    path = Path(out) if out is not None else model_dir / ONNX_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    dummy = torch.zeros(2, pp.in_chans, pp.input_size, pp.input_size)  # batch 2: no 0/1 specialization
    t_export = time.perf_counter()
    try:
        used = torch_to_onnx(CamHead(model), dummy, tmp, opset, exporter)
        export_seconds = time.perf_counter() - t_export
        clf = OnnxClassifier(tmp, verify=False, config=cfg, threads=threads)
        inputs, names = _parity_inputs(cfg, own, samples, parity_images)
        checked = parity(model, clf, inputs, tolerance)
        ood = build_ood(clf, own, ood_images, ood_quantile) if own is not None and ood_images > 0 else None
        meta = base_metadata(cfg, source_sha, opset, used) | {"parity": checked | {"inputs": names}}
        if ood is not None:
            meta["ood"] = ood.to_metadata()
        write_metadata(tmp, meta, _doc(cfg, "fp32"))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # never leave a file that failed its check where serving would look
    report = ExportReport(
        path=str(path),
        opset=opset,
        exporter=used,
        source_sha256=source_sha,
        onnx_sha256=record_onnx(path),
        max_abs_diff=checked["max_abs_diff_logits"],
        max_abs_diff_cam=checked["max_abs_diff_cam"],
        max_abs_diff_embedding=checked["max_abs_diff_embedding"],
        max_abs_logit=checked["max_abs_logit"],
        max_abs_cam=checked["max_abs_cam"],
        top1_agreement=checked["top1_agreement"],
        parity_images=checked["images"],
        parity_inputs=names,
        tolerance=tolerance,
        batch_sizes=checked["batch_sizes"],
        providers=clf.providers,
        export_seconds=round(export_seconds, 2),
        seconds=round(time.perf_counter() - t0, 2),
        size_mb=round(path.stat().st_size / 2**20, 2),
        ood=ood.summary() if ood is not None else None,
        notes=[] if own is not None else ["no training data found: parity on pydicom's CT DICOMs, no OOD"],
    )
    record_in_card(model_dir, path, "fp32", report.card_entry())
    return report


def matches_source(metadata: dict[str, Any], config: ModelConfig, weights_sha256: str) -> bool:
    """True when ONNX metadata names these weights, carries this config's preprocessing and this version's
    graph (the rule `export.integrity.check_fresh` enforces at load)."""
    try:
        check_fresh(metadata, Path(ONNX_NAME), config=config, source_sha256=weights_sha256)
    except StaleModelError:
        return False
    return True


def onnx_is_fresh(model_dir: str | Path, onnx_path: str | Path | None = None) -> bool:
    """True when the ONNX file exists, was exported from the current model.safetensors and carries the same
    preprocessing as the current config.json (its own checksum is checked by `OnnxClassifier`)."""
    model_dir = Path(model_dir)
    path = Path(onnx_path) if onnx_path else model_dir / ONNX_NAME
    weights = model_dir / WEIGHTS_NAME
    if not path.is_file() or not weights.is_file():
        return False
    from google.protobuf.message import DecodeError  # onnx's parse error; onnx is an optional extra

    try:
        meta = read_metadata(path)
        config = ModelConfig.load(model_dir)
    except (OSError, ValueError, DecodeError, CTHubError):  # unreadable ONNX, metadata or config: not fresh
        return False
    return matches_source(meta, config, sha256_file(weights))
