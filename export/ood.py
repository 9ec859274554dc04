"""Out-of-distribution reference: how far an input's features lie from the classifier's training data.

The served score (`LayeredOodReference`, method "ppca-mahalanobis-layers-max-z", graph version 3) looks at
the globally pooled output of each of the four ResNet stages (the exported graph's "stage_pool" output holds
layers 1-3, "embedding" layer 4). Per stage, the pooled features of real in-distribution training images are
log-compressed (log1p: non-negative averages of ReLU outputs with a long tail) and modelled by probabilistic
PCA (Tipping & Bishop 1999): mean, the top `rank` principal directions with their variances, one isotropic
variance for the remaining directions; a stage's distance is the Mahalanobis distance under that model,
sqrt(sum_i p_i² / λ_i + |residual|² / σ²). Each stage's distance is z-scored on held-out in-distribution
images, and the score is the largest of the four z-scores (after Lee et al. 2018's multi-layer detector).
Measured on real shifts (docs/results/ood-shifts.md): early stages see the intensity and texture changes of
a wrong window, a radiograph or a photograph that the last stage's pooled features are built to ignore.

Threshold: a high quantile (default the 99th percentile) of held-out in-distribution scores. A small
validation split makes that quantile noisy (16 images: the largest one or two decide it), so the held-out
scores are the validation images' pooled with cross-fitted scores of the training images: the training
images are split into `folds` folds, each scored by references fitted on the other folds and z-scored the
same way. The z-scores' means and spreads come from the same pooled held-out scores.

`OodReference` is the score of graph version 2 (method "ppca-mahalanobis": the last stage alone, threshold
the quantile of validation scores); files carrying it can still be read (`reference_from_metadata`).
Either reference travels in the ONNX file's metadata, covered by the file's sha256.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cthub.errors import ConfigError, ShapeError
from export.defaults import DEFAULT_OOD_FOLDS, DEFAULT_QUANTILE

METHOD = "ppca-mahalanobis"  # graph version 2: the last stage alone
LAYERED_METHOD = "ppca-mahalanobis-layers-max-z"  # graph version 3: the served score
DEFAULT_RANK = 32
STAGES = ("layer1", "layer2", "layer3", "layer4")
STAGE_WIDTHS = (256, 512, 1024, 2048)  # ResNet50's stage channels
POOLED_STAGES = STAGES[:3]  # the graph's "stage_pool" output: these, concatenated; layer4 is "embedding"
MIN_REFERENCE = 8  # embeddings a probabilistic PCA is fitted on, at least

Features = Mapping[str, np.ndarray]  # stage name -> pooled features [B, C]


def stage_features(stage_pool: np.ndarray | None, embedding: np.ndarray) -> dict[str, np.ndarray]:
    """{layer1..layer4: pooled features [B, C]} from the graph's "stage_pool" [B, 256+512+1024] and
    "embedding" [B, 2048] outputs (layer4 only when there is no stage_pool: a graph version 2 file)."""
    out = {STAGES[-1]: np.asarray(embedding)}
    if stage_pool is None:
        return out
    pool = np.asarray(stage_pool)
    widths = STAGE_WIDTHS[: len(POOLED_STAGES)]
    if pool.ndim != 2 or pool.shape[1] != sum(widths) or len(pool) != len(out[STAGES[-1]]):
        raise ShapeError(f"expected stage_pool [B, {sum(widths)}], got {pool.shape}")
    edges = np.cumsum((0, *widths))
    for name, a, b in zip(POOLED_STAGES, edges[:-1], edges[1:], strict=True):
        out[name] = pool[:, a:b]
    return out


def _features(embedding: np.ndarray) -> np.ndarray:
    """log1p of the (non-negative) pooled features, as float64 rows [B, D]."""
    e = np.asarray(embedding, dtype=np.float64)
    return np.log1p(np.maximum(e if e.ndim == 2 else e[None], 0.0))


def _malformed(e: Exception) -> ConfigError:
    return ConfigError(f"the out-of-distribution reference in the metadata is malformed ({e}): re-export")


def _encode(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).decode("ascii")


def _decode(text: str, shape: list[int]) -> np.ndarray:
    try:
        flat = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype=np.float32)
        return flat.reshape(shape)
    except (ValueError, TypeError) as e:
        raise _malformed(e) from None


def _check_quantile(quantile: float) -> None:
    if not 0 < quantile <= 1:
        raise ConfigError(f"the OOD quantile must be in (0, 1], got {quantile}")


@dataclass(frozen=True)
class Ppca:
    """Probabilistic PCA of log1p(pooled features): mean [D], components [r, D], variances [r] and the
    residual variance, stored as float32 (what a loader reads back is what was fitted)."""

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float

    @classmethod
    def fit(cls, embeddings: np.ndarray, rank: int = DEFAULT_RANK) -> Ppca:
        """From in-distribution features [N, D] (N >= MIN_REFERENCE)."""
        x = _features(embeddings)
        n, d = x.shape
        if n < MIN_REFERENCE or d < 2:
            raise ConfigError(
                f"the OOD reference needs at least {MIN_REFERENCE} embeddings [N, D], got {x.shape}"
            )
        r = max(1, min(rank, n - 2, d - 1))
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        ev = s**2 / (n - 1)
        residual = float(np.float32(max(ev[r:].sum() / (d - r), 1e-12)))
        # rounded to float32 as stored, so that thresholds are those of the reference a loader reads back
        return cls(
            mean.astype(np.float32).astype(np.float64),
            vt[:r].astype(np.float32),
            np.maximum(ev[:r], 1e-12).astype(np.float32).astype(np.float64),
            residual,
        )

    @property
    def rank(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def score(self, embedding: np.ndarray) -> np.ndarray:
        """Mahalanobis distances [B] of features [B, D] under this probabilistic PCA."""
        x = _features(embedding)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"expected embeddings [B, {self.dim}], got {np.shape(embedding)}")
        c = x - self.mean
        p = c @ self.components.T.astype(np.float64)
        residual = np.maximum((c**2).sum(axis=1) - (p**2).sum(axis=1), 0.0)
        return np.sqrt((p**2 / self.variances).sum(axis=1) + residual / self.residual_variance)

    def to_metadata(self) -> dict[str, Any]:
        """rank, dim and the arrays (base64 float32)."""
        return {
            "rank": self.rank,
            "dim": self.dim,
            "mean": _encode(self.mean),
            "components": _encode(self.components),
            "variances": _encode(self.variances),
            "residual_variance": self.residual_variance,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Ppca:
        try:
            r, d = int(meta["rank"]), int(meta["dim"])
            return cls(
                _decode(meta["mean"], [d]).astype(np.float64),
                _decode(meta["components"], [r, d]),
                _decode(meta["variances"], [r]).astype(np.float64),
                float(meta["residual_variance"]),
            )
        except (KeyError, TypeError) as e:
            raise _malformed(e) from None


@dataclass(frozen=True)
class OodReference:
    """Graph version 2's score: probabilistic-PCA Mahalanobis distance of the last stage's pooled features
    (`Ppca`), threshold the `quantile` of the validation images' distances."""

    ppca: Ppca
    threshold: float
    quantile: float
    info: dict[str, Any]
    method: str = field(default=METHOD, init=False)

    @classmethod
    def build(
        cls,
        reference: np.ndarray,
        held_out: np.ndarray,
        *,
        rank: int = DEFAULT_RANK,
        quantile: float = DEFAULT_QUANTILE,
        info: dict[str, Any] | None = None,
    ) -> OodReference:
        """From training embeddings [N, D] and held-out in-distribution embeddings [M, D]."""
        _check_quantile(quantile)
        ppca = Ppca.fit(reference, rank)
        scores = ppca.score(held_out)
        meta = dict(info or {}) | {
            "n_reference": len(reference),
            "n_held_out": len(scores),
            "rank": ppca.rank,
        }
        return cls(ppca, float(np.quantile(scores, quantile)), quantile, meta)

    def score(self, embedding: np.ndarray) -> np.ndarray:
        """Mahalanobis distances [B] of last-stage embeddings [B, D]."""
        return self.ppca.score(embedding)

    def score_stages(self, features: Features) -> np.ndarray:
        """The score from pooled stage features (uses layer4 only)."""
        return self.score(features[STAGES[-1]])

    def to_metadata(self) -> dict[str, Any]:
        """A JSON-able dict (arrays base64-encoded float32) for the ONNX metadata."""
        own = {"method": METHOD, "threshold": self.threshold, "quantile": self.quantile, "info": self.info}
        return own | self.ppca.to_metadata()

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> OodReference:
        if meta.get("method") != METHOD:
            raise ConfigError(f"unknown out-of-distribution method {meta.get('method')!r}: re-export")
        return cls(
            Ppca.from_metadata(meta),
            float(meta["threshold"]),
            float(meta["quantile"]),
            dict(meta.get("info", {})),
        )

    def summary(self) -> dict[str, Any]:
        """What a report shows: method, threshold, quantile and where the reference came from."""
        return {"method": METHOD, "threshold": self.threshold, "quantile": self.quantile} | self.info


def _folds(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """Index sets of up to `folds` folds of n items whose complements hold >= MIN_REFERENCE items each;
    none when fewer than two such folds fit."""
    k = min(folds, n // MIN_REFERENCE)
    if k < 2:
        return []
    return list(np.array_split(np.random.default_rng(seed).permutation(n), k))


def _check_stages(features: Features, stages: tuple[str, ...], what: str) -> None:
    missing = [s for s in stages if s not in features]
    if missing:
        raise ConfigError(f"the {what} features lack the stages {', '.join(missing)}")


@dataclass(frozen=True)
class LayeredOodReference:
    """The served score: the largest over stages of the z-scored probabilistic-PCA Mahalanobis distance of
    that stage's pooled features; z-scores and threshold from held-out in-distribution scores (validation
    images and cross-fitted training images)."""

    stages: dict[str, Ppca]
    z_mean: dict[str, float]
    z_std: dict[str, float]
    threshold: float
    quantile: float
    info: dict[str, Any]
    method: str = field(default=LAYERED_METHOD, init=False)

    @classmethod
    def build(
        cls,
        train: Features,
        val: Features,
        *,
        stages: tuple[str, ...] = STAGES,
        rank: int = DEFAULT_RANK,
        quantile: float = DEFAULT_QUANTILE,
        folds: int = DEFAULT_OOD_FOLDS,
        seed: int = 0,
        info: dict[str, Any] | None = None,
    ) -> LayeredOodReference:
        """From pooled stage features of training images (`train`: stage -> [N, C]) and validation images
        (`val`: stage -> [M, C], M may be 0 when the training images allow cross-fitting). `folds` <= 1:
        validation images only, as graph version 2 did."""
        _check_quantile(quantile)
        _check_stages(train, stages, "training")
        _check_stages(val, stages, "validation")
        n, m = len(train[stages[0]]), len(val[stages[0]])
        fitted = {s: Ppca.fit(train[s], rank) for s in stages}
        held: dict[str, list[np.ndarray]] = {s: [fitted[s].score(val[s])] if m else [] for s in stages}
        parts = _folds(n, folds, seed) if folds > 1 else []
        for part in parts:
            rest = np.setdiff1d(np.arange(n), part)
            for s in stages:
                held[s].append(Ppca.fit(train[s][rest], rank).score(train[s][part]))
        pooled = {s: np.concatenate(held[s]) if held[s] else np.zeros(0) for s in stages}
        total = len(pooled[stages[0]])
        if total < 2:
            raise ConfigError(
                f"the OOD threshold needs held-out scores: {m} validation images and {n} training images "
                f"(cross-fitting needs at least {2 * MIN_REFERENCE})"
            )
        z_mean = {s: float(pooled[s].mean()) for s in stages}
        z_std = {s: float(pooled[s].std()) or 1.0 for s in stages}
        held_scores = np.max([(pooled[s] - z_mean[s]) / z_std[s] for s in stages], axis=0)
        meta = dict(info or {}) | {
            "stages": list(stages),
            "rank": {s: fitted[s].rank for s in stages},
            "n_reference": n,
            "n_held_out": total,
            "n_validation": m,
            "n_cross_fitted": total - m,
            "folds": len(parts),
        }
        threshold = float(np.quantile(held_scores, quantile))
        return cls(fitted, z_mean, z_std, threshold, quantile, meta)

    def stage_scores(self, features: Features) -> dict[str, np.ndarray]:
        """Each stage's z-scored distance [B]."""
        _check_stages(features, tuple(self.stages), "scored")
        return {s: (p.score(features[s]) - self.z_mean[s]) / self.z_std[s] for s, p in self.stages.items()}

    def score_stages(self, features: Features) -> np.ndarray:
        """Scores [B]: the largest of the stages' z-scored distances."""
        return np.max(list(self.stage_scores(features).values()), axis=0)

    def to_metadata(self) -> dict[str, Any]:
        """A JSON-able dict (arrays base64-encoded float32) for the ONNX metadata."""
        return {
            "method": LAYERED_METHOD,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "stages": {
                s: p.to_metadata() | {"z_mean": self.z_mean[s], "z_std": self.z_std[s]}
                for s, p in self.stages.items()
            },
            "info": self.info,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> LayeredOodReference:
        if meta.get("method") != LAYERED_METHOD:
            raise ConfigError(f"unknown out-of-distribution method {meta.get('method')!r}: re-export")
        raw = meta.get("stages")
        if not isinstance(raw, dict) or not raw or any(s not in STAGES for s in raw):
            raise ConfigError("the out-of-distribution reference in the metadata names no known stages")
        try:
            z_mean = {s: float(raw[s]["z_mean"]) for s in raw}
            z_std = {s: float(raw[s]["z_std"]) for s in raw}
            threshold, quantile = float(meta["threshold"]), float(meta["quantile"])
        except (KeyError, TypeError, ValueError) as e:
            raise _malformed(e) from None
        stages = {s: Ppca.from_metadata(raw[s]) for s in STAGES if s in raw}
        return cls(stages, z_mean, z_std, threshold, quantile, dict(meta.get("info", {})))

    def summary(self) -> dict[str, Any]:
        """What a report shows: method, threshold, quantile, the stages and where the reference came from."""
        return {"method": LAYERED_METHOD, "threshold": self.threshold, "quantile": self.quantile} | self.info


AnyOodReference = OodReference | LayeredOodReference


def reference_from_metadata(meta: Mapping[str, Any]) -> AnyOodReference:
    """The reference an ONNX file's `cthub.ood` metadata holds, by its method (both graph versions')."""
    method = meta.get("method")
    if method == LAYERED_METHOD:
        return LayeredOodReference.from_metadata(meta)
    if method == METHOD:
        return OodReference.from_metadata(meta)
    raise ConfigError(f"unknown out-of-distribution method {method!r}: re-export the model")
