"""Out-of-distribution, measured: how well a served model's OOD score separates its own test images from real
shifts, one row per shift (`cthub evaluate-ood`, `make study-ood`).

Every image goes through the model's own preprocessing (`ctdata.preprocess`: DICOM in HU through the model's
mapping, pictures as grey 0..255) and the model's exported ONNX file (`OnnxClassifier`), and is scored as
serving scores it (`Classifier.ood_score`). Per shift: AUROC of the score (own test images negative, the shift
positive), the false-positive rate on the own test images at the score that catches 95% of the shift (FPR at
95% TPR), and the share of the shift above the served threshold.

Each shift is marked `far` or `near` before measuring, by what it is:
- far: not a CT slice of the anatomy the model was trained on, or not a slice at all: another modality (MR,
  ultrasound, radiographs), photographs, screen captures (a rendered figure), head CT for a body model, body
  CT for a head model;
- near: CT in HU of overlapping anatomy taken otherwise (whole slices of other sources for an organ-crop
  model, another head CT scanner for a head model) and windowing mistakes (the model's own test images, the
  same anatomy, written in another window).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctdata.io import load_image
from ctdata.preprocess import (
    WINDOW_PRESETS,
    PreprocessConfig,
    hu_to_unit,
    intensities_to_unit,
    prepare_batch,
    unit_to_input,
)
from cthub.errors import ConfigError, InputError
from export.classifier import Classifier, InferenceOutputs
from export.data import load_model_data

log = logging.getLogger(__name__)

FAR, NEAR = "far", "near"
HEAD_WINDOWS = ("brain", "subdural", "stroke")  # a model mapping HU with one of these is a head model
REAL_CT_SOURCES = ("fnndsc_chest", "lung_pet_ct_dx", "siim_contrast", "ge_head_tilt")
HEAD_SOURCES = ("ge_head_tilt",)
# Distinct images of pydicom's test files and pydicom-data (one encoding each; multi-frame files give up to
# MAX_FRAMES evenly spaced frames). Names missing from the installed packages are skipped and listed.
MR_FILES = (
    "MR_small.dcm",
    "emri_small.dcm",
    "MR2_UNCR.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "examples_overlay.dcm",
)
US_FILES = (
    "US1_UNCR.dcm",
    "examples_rgb_color.dcm",
    "examples_ybr_color.dcm",
    "examples_palette.dcm",
    "examples_jpeg2k.dcm",
    "OBXXXX1A_2frame.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "ExplVR_BigEnd.dcm",
)
XRAY_FILES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm")
MAX_FRAMES = 10
PHOTO_CROPS = 11  # random square crops per photograph, besides the whole picture
WRONG_WINDOWS = ("bone", "lung")
CHUNK = 64


@dataclass
class Shift:
    """One row's images, as model inputs [N, C, S, S], with what they are and why they are far or near."""

    name: str
    distance: str
    why: str
    source: str
    inputs: np.ndarray
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShiftRow:
    """One measured row of the table."""

    name: str
    distance: str
    why: str
    source: str
    n: int
    auroc: float
    fpr_at_95_tpr: float
    flagged: float  # share of the shift above the served threshold
    median_score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distance": self.distance,
            "why": self.why,
            "source": self.source,
            "n": self.n,
            "auroc": round(self.auroc, 4),
            "fpr_at_95_tpr": round(self.fpr_at_95_tpr, 4),
            "flagged": round(self.flagged, 4),
            "median_score": round(self.median_score, 4),
        }


@dataclass
class OodTable:
    """The table of one model and one score: the in-distribution images and one row per shift."""

    model: str
    method: str
    threshold: float | None
    n_in: int
    in_flagged: float
    in_median_score: float
    rows: list[ShiftRow]
    skipped: list[str] = field(default_factory=list)

    @property
    def far_min_auroc(self) -> float | None:
        far = [r.auroc for r in self.rows if r.distance == FAR]
        return min(far) if far else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "threshold": self.threshold,
            "n_in": self.n_in,
            "in_flagged": round(self.in_flagged, 4),
            "in_median_score": round(self.in_median_score, 4),
            "far_min_auroc": None if self.far_min_auroc is None else round(self.far_min_auroc, 4),
            "rows": [r.to_dict() for r in self.rows],
            "skipped": list(self.skipped),
        }

    def markdown(self) -> str:
        """The table as Markdown: one row per shift, then what was skipped."""
        thr = "none" if self.threshold is None else f"{self.threshold:.4g}"
        lines = [
            f"Model `{self.model}`, score `{self.method}`, threshold {thr}; in-distribution: {self.n_in} of "
            f"its own test images, {100 * self.in_flagged:.1f}% above the threshold (median score "
            f"{self.in_median_score:.4g}).",
            "",
            "| shift | far/near | n | AUROC | FPR at 95% TPR | flagged | median score | images |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.distance} | {r.n} | {r.auroc:.3f} | {r.fpr_at_95_tpr:.3f} | "
                f"{100 * r.flagged:.0f}% | {r.median_score:.4g} | {r.source} |"
            )
        if self.skipped:
            lines += ["", "Skipped: " + "; ".join(self.skipped)]
        return "\n".join(lines)


def auroc_and_fpr95(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[float, float]:
    """AUROC of scores separating `out_scores` (positives) from `in_scores`, and the share of `in_scores` at
    or above the highest threshold that still flags 95% of `out_scores` (FPR at 95% TPR)."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ConfigError("AUROC needs in-distribution and shifted scores")
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    auroc = float(roc_auc_score(y, np.r_[a, b]))
    cut = np.quantile(b, 0.05, method="lower")  # 95% of the shift scores lie at or above it
    return auroc, float(np.mean(a >= cut))


# -- the images of each shift ----------------------------------------------------------------------------


def is_head_model(cfg: PreprocessConfig) -> bool:
    """A model whose HU mapping is a head window (brain, subdural, stroke): its far CT shift is body CT."""
    return cfg.mapping == "window" and cfg.window in HEAD_WINDOWS


def evenly(items: Sequence[Any], n: int) -> list[Any]:
    """At most `n` items spread evenly over `items` (all when there are no more)."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def _stack(units: Iterable[np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    arrs = [unit_to_input(u, cfg).numpy() for u in units]
    if not arrs:
        return np.zeros((0, cfg.in_chans, cfg.input_size, cfg.input_size), dtype=np.float32)
    return np.stack(arrs).astype(np.float32)


def frames_of(path: Path, cfg: PreprocessConfig, max_frames: int = MAX_FRAMES) -> list[np.ndarray]:
    """The unit images [H, W] of up to `max_frames` evenly spaced frames of one file, each mapped by the
    model's own step (`intensities_to_unit`: HU through its mapping, other images as grey 0..255)."""
    with warnings.catch_warnings():  # pydicom's test files carry header quirks on purpose
        warnings.simplefilter("ignore")
        image = load_image(path)
    pixels = image.pixels if image.pixels.ndim == 3 else image.pixels[None]
    return [intensities_to_unit(f, image.is_hu, cfg) for f in evenly(list(pixels), max_frames)]


def files_shift(
    name: str, distance: str, why: str, paths: Sequence[Path], cfg: PreprocessConfig, max_images: int
) -> Shift:
    """A shift from image files (DICOM or pictures), unreadable ones skipped and noted."""
    units: list[np.ndarray] = []
    notes: list[str] = []
    for p in paths:
        try:
            units.extend(frames_of(p, cfg))
        except InputError as e:
            notes.append(f"{p.name}: {e}")
    units = evenly(units, max_images)
    files = sorted({p.name for p in paths})
    source = f"{len(units)} images of {len(paths)} files" + (
        f" ({', '.join(files)})" if len(files) <= 12 else ""
    )
    return Shift(name, distance, why, source, _stack(units, cfg), notes)


def pydicom_files(names: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The named test files of pydicom (its wheel, then pydicom-data), and the names not installed."""
    from pydicom.data import get_testdata_file

    found, missing = [], []
    for n in names:
        try:
            p = get_testdata_file(n, download=False)
        except (ValueError, OSError):
            p = None
        if p:
            found.append(Path(str(p)))
        else:
            missing.append(n)
    return found, missing


def real_ct_shifts(root: Path, cfg: PreprocessConfig, max_images: int) -> Iterator[Shift]:
    """One row per source folder of `real_ct/` (whole slices in HU through the model's mapping)."""
    head = is_head_model(cfg)
    for src in REAL_CT_SOURCES:
        folder = root / src
        if not folder.is_dir():
            continue
        paths = evenly(sorted(p for p in folder.rglob("*.dcm") if p.is_file()), max_images)
        if src in HEAD_SOURCES:
            distance, why = (
                (NEAR, "head CT of another scanner and source: the anatomy the model knows, taken otherwise")
                if head
                else (FAR, "head CT for a body model: the brain and skull, absent from its training")
            )
        else:
            distance, why = (
                (FAR, "body CT (chest, upper abdomen) for a head model")
                if head
                else (
                    NEAR,
                    "body CT in HU, whole slices of another source: organs the model saw, not cropped",
                )
            )
        yield files_shift(f"real_ct/{src}", distance, why, paths, cfg, max_images)


def head_png_shift(folder: Path, cfg: PreprocessConfig, max_images: int) -> Shift:
    """Head CT slices as PNG (already windowed), for a body model."""
    paths = evenly(sorted(folder.glob("*.png")), max_images)
    return files_shift(
        "head_ct PNG", FAR, "head CT for a body model (PNG, brain window)", paths, cfg, max_images
    )


def body_uint8_shift(npz: Path, cfg: PreprocessConfig, max_images: int) -> Shift:
    """OrganAMNIST test images (abdominal CT, stored uint8 as its window made them), for a head model."""
    from ctdata.datasets import load_medmnist

    test = load_medmnist(npz, "test")
    images = np.asarray(evenly(list(test.images), max_images))
    inputs = np.concatenate(
        [prepare_batch(images[i : i + CHUNK], cfg).numpy() for i in range(0, len(images), CHUNK)]
    )
    return Shift(
        "OrganAMNIST test",
        FAR,
        "body CT (abdominal organ crops) for a head model",
        f"{len(images)} images of {npz.name}",
        inputs,
    )


def modality_shifts(cfg: PreprocessConfig, max_images: int) -> Iterator[Shift]:
    """MR, ultrasound and radiograph objects of pydicom's test files and pydicom-data."""
    for name, files, what in (
        ("MR (pydicom)", MR_FILES, "magnetic resonance"),
        ("ultrasound (pydicom)", US_FILES, "ultrasound, colour converted to grey"),
        ("X-ray (pydicom)", XRAY_FILES, "computed radiographs"),
    ):
        paths, missing = pydicom_files(files)
        if not paths:
            continue
        shift = files_shift(name, FAR, f"another modality: {what}", paths, cfg, max_images)
        shift.notes += [f"{m}: not installed" for m in missing]
        yield shift


def photographs() -> list[tuple[str, np.ndarray]]:
    """Photographs shipped with scikit-learn (china, flower) and matplotlib (grace_hopper), grey 0..255."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out: list[tuple[str, np.ndarray]] = []
    ds = load_sample_images()
    for fname, img in zip(ds.filenames, ds.images, strict=True):
        out.append((Path(fname).name, np.asarray(Image.fromarray(img).convert("L"), dtype=np.float32)))
    try:
        from matplotlib import cbook

        path = Path(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
        with Image.open(path) as im:
            out.append(("grace_hopper.jpg", np.asarray(im.convert("L"), dtype=np.float32)))
    except (OSError, ValueError):
        pass
    return out


def photo_shift(cfg: PreprocessConfig, seed: int = 0) -> Shift:
    """Each photograph whole and as PHOTO_CROPS random square crops (30-100% of its short side)."""
    rng = np.random.default_rng(seed)
    units, names = [], []
    for name, grey in photographs():
        names.append(name)
        units.append(grey / 255.0)
        h, w = grey.shape
        for _ in range(PHOTO_CROPS):
            s = int(rng.uniform(0.3, 1.0) * min(h, w))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            units.append(grey[y : y + s, x : x + s] / 255.0)
    source = f"{len(units)} images: {len(names)} photos ({', '.join(names)}), whole + {PHOTO_CROPS} crops"
    return Shift("photographs", FAR, "not a medical image", source, _stack(units, cfg))


def render_screen_capture(unit: np.ndarray, title: str) -> bytes:
    """A slice in [0, 1] shown the way a screenshot of a plotting window shows it: matplotlib figure 4x4 in
    at 100 dpi, grey colormap, axes with ticks, a title, a colour bar labelled HU, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.add_subplot()
    shown = ax.imshow(unit, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    fig.colorbar(shown, ax=ax, label="HU (window)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def screen_shift(name: str, why: str, units: Sequence[np.ndarray], cfg: PreprocessConfig, what: str) -> Shift:
    """Screen captures of `units`, read back through the model's picture path (PNG -> grey 0..255)."""
    rendered = []
    for i, u in enumerate(units):
        image = load_image(render_screen_capture(u, f"slice {i + 1}"))
        rendered.append(intensities_to_unit(image.pixels[0], image.is_hu, cfg))
    source = f"{len(rendered)} matplotlib figures (axes, title, colour bar) of {what}"
    return Shift(name, FAR, why, source, _stack(rendered, cfg))


def window_shifts(test_uint8: np.ndarray, cfg: PreprocessConfig) -> Iterator[Shift]:
    """The model's own test images as if written in another window: a stored grey value g of the model's
    window [lo, hi] is HU lo + g (hi - lo) / 255, mapped again through the wrong window (values the dataset
    had already clipped at the window's edges stay at those edges)."""
    if cfg.mapping != "window":
        return
    lo, hi = cfg.window_bounds()
    hu = lo + test_uint8.astype(np.float32) * ((hi - lo) / 255.0)
    for preset in WRONG_WINDOWS:
        if preset == cfg.window:
            continue
        c, w = WINDOW_PRESETS[preset]
        wrong = cfg.replace(window=preset, window_center=None, window_width=None)
        units = hu_to_unit(hu, wrong)
        yield Shift(
            f"wrong window: {preset}",
            NEAR,
            "the model's own test images, same anatomy, written in another window",
            f"{len(units)} own test images, {cfg.window or 'own'} window -> {preset} ({c:g}/{w:g} HU)",
            _stack(units, cfg),
        )


# -- scoring and the table -------------------------------------------------------------------------------

ScoreFn = Callable[[InferenceOutputs], np.ndarray]


def model_outputs(clf: Classifier, inputs: np.ndarray) -> InferenceOutputs:
    """One forward pass over all `inputs`, CHUNK at a time."""
    parts = [clf.outputs(inputs[i : i + CHUNK], maps=False) for i in range(0, len(inputs), CHUNK)]
    pools = [p.stage_pool for p in parts if p.stage_pool is not None]
    return InferenceOutputs(
        np.concatenate([p.logits for p in parts]),
        np.concatenate([p.probabilities for p in parts]),
        None,  # maps are not needed here
        np.concatenate([p.embedding for p in parts]),
        np.concatenate(pools) if len(pools) == len(parts) else None,
    )


def served_score(clf: Classifier) -> ScoreFn:
    """The score serving answers with: the classifier's own OOD reference on the pooled stage features."""
    return clf.ood_score


def build_shifts(
    clf: Classifier, real_data: Path, test_uint8: np.ndarray, screen_uint8: np.ndarray, max_images: int
) -> tuple[list[Shift], list[str]]:
    """Every shift that can be built here for this model, and what could not (missing data)."""
    cfg = clf.config.preprocessing
    shifts: list[Shift] = []
    skipped: list[str] = []
    real_ct = real_data / "real_ct"
    if real_ct.is_dir():
        shifts += list(real_ct_shifts(real_ct, cfg, max_images))
    else:
        skipped.append(f"{real_ct}: not found")
    if is_head_model(cfg):
        npz = real_data / "organamnist.npz"
        if npz.is_file():
            shifts.append(body_uint8_shift(npz, cfg, max_images))
        else:
            skipped.append(f"{npz}: not found")
    else:
        head = real_data / "head_ct"
        if head.is_dir():
            shifts.append(head_png_shift(head, cfg, max_images))
        else:
            skipped.append(f"{head}: not found")
    shifts += list(modality_shifts(cfg, max_images))
    shifts.append(photo_shift(cfg))
    own_units = [u.astype(np.float32) / 255.0 for u in screen_uint8]
    shifts.append(
        screen_shift(
            "screen capture: own test images",
            "a rendered figure (axes, text, colour bar, margins) of the model's own kind of image",
            own_units,
            cfg,
            "other test images of the model's own data",
        )
    )
    ct_paths = evenly(sorted(real_ct.rglob("*.dcm")), len(screen_uint8)) if real_ct.is_dir() else []
    if ct_paths:
        units = [frames_of(p, cfg, 1)[0] for p in ct_paths]
        shifts.append(
            screen_shift(
                "screen capture: real CT slices",
                "a rendered figure (axes, text, colour bar, margins) of whole CT slices",
                units,
                cfg,
                f"real_ct/ slices in the model's mapping (from {len({p.parent for p in ct_paths})} folders)",
            )
        )
    shifts += list(window_shifts(test_uint8, cfg))
    for s in shifts:
        skipped += [f"{s.name}: {n}" for n in s.notes]
    return [s for s in shifts if len(s.inputs)], skipped


def measure(
    in_scores: np.ndarray, shifts: Sequence[tuple[Shift, np.ndarray]], threshold: float | None
) -> list[ShiftRow]:
    """One row per (shift, its scores) against the in-distribution scores."""
    rows = []
    for s, scores in shifts:
        auroc, fpr = auroc_and_fpr95(in_scores, scores)
        flagged = float(np.mean(scores > threshold)) if threshold is not None else float("nan")
        rows.append(
            ShiftRow(
                s.name,
                s.distance,
                s.why,
                s.source,
                len(scores),
                auroc,
                fpr,
                flagged,
                float(np.median(scores)),
            )
        )
    return rows


@dataclass
class Evaluation:
    """The outputs the table is measured from, kept so that several scores can be compared on them."""

    model: str
    in_inputs: np.ndarray
    in_outputs: InferenceOutputs
    shifts: list[tuple[Shift, InferenceOutputs]]
    skipped: list[str]

    def table(self, method: str, score: ScoreFn, threshold: float | None) -> OodTable:
        in_scores = score(self.in_outputs)
        scored = [(s, score(o)) for s, o in self.shifts]
        flagged = float(np.mean(in_scores > threshold)) if threshold is not None else float("nan")
        return OodTable(
            self.model,
            method,
            threshold,
            len(in_scores),
            flagged,
            float(np.median(in_scores)),
            measure(in_scores, scored, threshold),
            self.skipped,
        )


def evaluate_shifts(
    clf: Classifier,
    real_data: Path,
    data: Path,
    *,
    in_images: int = 1000,
    max_images: int = 300,
    screen_images: int = 24,
    seed: int = 0,
) -> Evaluation:
    """The model's outputs on `in_images` of its own test split (`data`, split as fine-tuning split it) and
    on every shift built from `real_data` (the folder holding real_ct/, head_ct/, organamnist.npz), pydicom's
    test files, scikit-learn's and matplotlib's photographs."""
    own = load_model_data(clf.config, data)
    test = own.take("test", in_images + screen_images, seed)
    screens = min(screen_images, len(test.images) // 4)  # a small test split keeps most for the own rows
    order = np.random.default_rng(seed).permutation(len(test.images))
    in_idx, screen_idx = order[: len(order) - screens], order[len(order) - screens :]
    in_uint8 = test.images[np.sort(in_idx)][:in_images]
    in_inputs = np.concatenate(
        [
            prepare_batch(in_uint8[i : i + CHUNK], own.preprocessing).numpy()
            for i in range(0, len(in_uint8), CHUNK)
        ]
    )
    shifts, skipped = build_shifts(clf, real_data, in_uint8, test.images[np.sort(screen_idx)], max_images)
    outs = [(s, model_outputs(clf, s.inputs)) for s in shifts]
    return Evaluation(clf.config.name, in_inputs, model_outputs(clf, in_inputs), outs, skipped)


# -- the field's other scores on the same images (`cthub evaluate-ood --compare`) ----------------------------

LAYERS = ("layer1", "layer2", "layer3", "layer4")


def torch_features(model: Any, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Globally pooled outputs of the four ResNet stages [N, C_i] and the logits [N, K], with torch (the
    same features as the ONNX graph's stage_pool and embedding outputs)."""
    import torch

    out: dict[str, list[np.ndarray]] = {k: [] for k in (*LAYERS, "logits")}
    with torch.inference_mode():
        for i in range(0, len(inputs), CHUNK):
            x = torch.from_numpy(np.ascontiguousarray(inputs[i : i + CHUNK], dtype=np.float32))
            maps = model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
            for name, m in zip(LAYERS, maps, strict=True):
                out[name].append(m.mean(dim=(2, 3)).float().numpy())
            out["logits"].append(model.forward_head(maps[-1]).float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


SERVED_RECIPE = "ppca layers 1-4, max of z, served (z and threshold on val + cross-fitted train)"


def candidate_scores(train: dict[str, np.ndarray], val: dict[str, np.ndarray]) -> dict[str, ScoreOfFeatures]:
    """The scores compared, each fitted on training features (val: the z-scores' mean and spread):
    probabilistic-PCA Mahalanobis (export.ood) per stage and over all four (sum and max of their z-scores
    on validation, after Lee et al. 2018's multi-layer detector), the energy score (Liu et al. 2020) and
    the cosine distance to the 10th nearest training embedding (Sun et al. 2022); their threshold is the
    99th percentile of validation scores (`compare_scores`). Besides, the served recipe
    (`served_recipe`)."""
    from export.ood import OodReference

    def ppca(layer: str) -> ScoreOfFeatures:
        ref = OodReference.build(train[layer], val[layer])
        return lambda f: ref.score(f[layer])

    def zscored(fn: ScoreOfFeatures) -> ScoreOfFeatures:
        v = fn(val)
        mean, spread = float(v.mean()), float(v.std()) or 1.0
        return lambda f: (fn(f) - mean) / spread

    def energy(f: dict[str, np.ndarray]) -> np.ndarray:
        z = f["logits"].astype(np.float64)
        top = z.max(axis=1)
        return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))

    bank = train["layer4"] / np.maximum(np.linalg.norm(train["layer4"], axis=1, keepdims=True), 1e-12)

    def knn(f: dict[str, np.ndarray], k: int = 10) -> np.ndarray:
        x = f["layer4"] / np.maximum(np.linalg.norm(f["layer4"], axis=1, keepdims=True), 1e-12)
        return np.sort(1.0 - x @ bank.T, axis=1)[:, min(k, len(bank)) - 1]

    per_layer = {f"ppca {layer}": ppca(layer) for layer in LAYERS}
    z = [zscored(fn) for fn in per_layer.values()]
    return per_layer | {
        "ppca layers 1-4, sum of z": lambda f: np.sum([g(f) for g in z], axis=0),
        "ppca layers 1-4, max of z": lambda f: np.max([g(f) for g in z], axis=0),
        "energy (logits)": energy,
        "kNN layer4 (k=10, cosine)": knn,
    }


ScoreOfFeatures = Callable[[dict[str, np.ndarray]], np.ndarray]


def served_recipe(train: dict[str, np.ndarray], val: dict[str, np.ndarray]) -> tuple[ScoreOfFeatures, float]:
    """The served score (`export.ood.LayeredOodReference`, as the export builds it) fitted on these
    features, with its own threshold (held-out scores: validation and cross-fitted training images)."""
    from export.ood import LayeredOodReference

    ref = LayeredOodReference.build(train, val)
    return ref.score_stages, ref.threshold


def compare_scores(model_dir: Path, evaluation: Evaluation, data: Path, n_fit: int = 500) -> list[OodTable]:
    """One table per candidate score (`candidate_scores`, then `served_recipe`) on the evaluation's images,
    each with its own threshold (99th percentile of validation scores; the served recipe's own), fitted on
    up to `n_fit` train / val images."""
    from export.data import batches
    from hub.io import load_dir

    model = load_dir(model_dir).float().eval()
    own = load_model_data(evaluation_config(evaluation, model), data)
    fit = {
        split: torch_features(
            model, np.concatenate(list(batches(own.take(split, n_fit).images, own.preprocessing)))
        )
        for split in ("train", "val")
    }
    feats_in = torch_features(model, evaluation.in_inputs)
    feats_shift = [(s, torch_features(model, s.inputs)) for s, _ in evaluation.shifts]
    scored_by: list[tuple[str, ScoreOfFeatures, float]] = [
        (name, fn, float(np.quantile(fn(fit["val"]), 0.99)))
        for name, fn in candidate_scores(fit["train"], fit["val"]).items()
    ]
    scored_by.append((SERVED_RECIPE, *served_recipe(fit["train"], fit["val"])))
    tables = []
    for name, fn, threshold in scored_by:
        in_scores = fn(feats_in)
        scored = [(s, fn(f)) for s, f in feats_shift]
        tables.append(
            OodTable(
                evaluation.model,
                name,
                threshold,
                len(in_scores),
                float(np.mean(in_scores > threshold)),
                float(np.median(in_scores)),
                measure(in_scores, scored, threshold),
                evaluation.skipped,
            )
        )
    return tables


def evaluation_config(evaluation: Evaluation, model: Any) -> Any:
    """The ModelConfig `hub.io.load_dir` attached to the model (the evaluation's model name checked)."""
    from export.classifier import model_config

    cfg = model_config(model)
    if cfg.name != evaluation.model:
        raise ConfigError(f"the evaluation is of {evaluation.model}, the weights are {cfg.name}")
    return cfg


def comparison_markdown(tables: Sequence[OodTable]) -> str:
    """AUROC of each score (rows) on each shift (columns), the lowest far AUROC, and the share of the own
    test images above each score's threshold."""
    shifts = [r.name for r in tables[0].rows]
    lines = [
        "| score | " + " | ".join(shifts) + " | lowest far | own test above threshold |",
        "|---|" + "---|" * (len(shifts) + 2),
    ]
    for t in tables:
        far = t.far_min_auroc
        cells = " | ".join(f"{r.auroc:.3f}" for r in t.rows)
        lines.append(
            f"| {t.method} | {cells} | {'n/a' if far is None else f'{far:.3f}'} | {100 * t.in_flagged:.1f}% |"
        )
    return "\n".join(lines)
