"""Model cards: README.md with YAML front matter that the Hugging Face Hub understands.

A card states only what was measured: the metrics in `config.metrics`, on the data and by the command
recorded in `config.provenance`. Nothing is claimed that the config does not carry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from hub.config import CARD_NAME, ModelConfig

METHOD_NAMES = {
    "spark": "SparK (sparse masked modeling for CNNs)",
    "mocov2": "MoCo v2",
    "swav": "SwAV",
    "byol": "BYOL",
    "supervised": "supervised",
    "random": "none (random initialisation)",
}


def front_matter(cfg: ModelConfig) -> dict[str, Any]:
    """The card's YAML metadata as the Hugging Face Hub reads it (library, tags, licence, data, metrics)."""
    prov = cfg.provenance
    meta: dict[str, Any] = {
        "library_name": "ct-ssl-hub",
        "license": prov.get("license", "other"),
        "tags": ["medical-imaging", "computed-tomography", "self-supervised", cfg.method, cfg.architecture],
        "pipeline_tag": "image-classification" if cfg.num_classes > 0 else "image-feature-extraction",
    }
    if prov.get("datasets"):
        meta["datasets"] = list(prov["datasets"])
    flat = {k: v for k, v in cfg.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if flat:
        meta["metrics"] = sorted(flat)
        meta["model-index"] = [
            {
                "name": cfg.name,
                "results": [
                    {
                        "task": {"type": cfg.task or "image-classification"},
                        "dataset": {
                            "name": prov.get("data", "see provenance"),
                            "type": prov.get("data", "unknown"),
                        },
                        "metrics": [
                            {"type": k, "value": float(v), "name": k} for k, v in sorted(flat.items())
                        ],
                    }
                ],
            }
        ]
    return meta


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def comparison_lines(cfg: ModelConfig) -> list[str]:
    """The card's "What the pretraining bought" section from `metrics["vs_random_init"]` (written by the
    main job) and the encoder's pretraining budget from provenance, else nothing."""
    cmp, enc = cfg.metrics.get("vs_random_init"), cfg.provenance.get("encoder_pretraining") or {}
    if not isinstance(cmp, dict):
        return []
    ours, base = cmp.get("test") or {}, cmp.get("baseline_test") or {}
    wall = enc.get("wall_time_s")
    minutes = wall / 60 if isinstance(wall, (int, float)) else None
    budget = (
        f"{METHOD_NAMES.get(cfg.method, cfg.method)} on {cfg.pretraining_data}, {enc.get('steps')} steps"
        + (f", {_fmt(enc.get('epochs'), '.2f')} epochs" if enc.get("epochs") is not None else "")
        + (f", {minutes:.0f} min" if minutes is not None else "")
    )
    return [
        "",
        "## What the pretraining bought",
        "",
        f"- Encoder `{cfg.provenance.get('encoder')}`: {budget}.",
        f"- Fine-tuned on {cmp.get('n_train')} labeled images; on {ours.get('n')} test images: AUC "
        f"{_fmt(ours.get('auc'), '.4f')} vs {_fmt(base.get('auc'), '.4f')} for {cmp.get('baseline')} "
        f"(Δ {_fmt(cmp.get('delta_auc'), '+.4f')}), macro F1 {_fmt(ours.get('f1'), '.4f')} vs "
        f"{_fmt(base.get('f1'), '.4f')} (Δ {_fmt(cmp.get('delta_f1'), '+.4f')}). One seed: a single "
        "comparison, not a study (`make study` has the 3-seed tables).",
        f"- Baseline: `{cmp.get('baseline_command')}`",
    ]


def _pm(stat: Any, runs: Any = None) -> str:
    """{"mean": m, "std": s} -> 'm ± s' at the 4 decimals the study records (rounding again would disagree
    with its tables); the mean alone for a single run; else 'n/a'."""
    if not isinstance(stat, dict) or not isinstance(stat.get("mean"), (int, float)):
        return "n/a"
    std = stat.get("std")
    spread = isinstance(std, (int, float)) and runs != 1
    return f"{stat['mean']:.4f}" + (f" ± {std:.4f}" if spread else "")


def study_lines(study: Any) -> list[str]:
    """The card's "Fine-tuned with few labels" section from `metrics["finetune_study"]` (written by `cthub
    study`): per data set and protocol, this encoder's test AUC / macro F1 per label fraction beside random
    init's on the same cells, else nothing."""
    if not isinstance(study, dict) or not study:
        return []
    lines = ["", "## Fine-tuned with few labels", ""]
    for key, entry in sorted(study.items()):
        rows = (entry or {}).get("test") or {}
        if not rows:
            continue
        data, _, protocol = key.partition(":")
        lines += [
            f"**{data}** ({protocol or 'split'}; test metrics, mean ± std over "
            f"{'/'.join(sorted({str(r.get('runs')) for r in rows.values()}))} runs):",
            "",
            "| labels | training images | AUC | macro F1 | random init AUC | Δ AUC |",
            "|---|---|---|---|---|---|",
        ]
        for frac, r in sorted(rows.items(), key=lambda kv: -float(kv[0].rstrip("%"))):
            delta = r.get("delta_auc_vs_scratch")
            lines.append(
                f"| {frac} | {_fmt(r.get('n_train'), ',')} | {_pm(r.get('auc'), r.get('runs'))} "
                f"| {_pm(r.get('f1'), r.get('runs'))} | {_pm(r.get('scratch_auc'), r.get('runs'))} "
                f"| {_fmt(delta, '+.4f')} |"
            )
        lines += ["", f"Command: `{entry.get('command')}`", ""]
    return lines[:-1]


def frozen_feature_lines(frozen: Any) -> list[str]:
    """The card's "Frozen features" section from `metrics["frozen_features"]` (`finetune.evaluate_encoder`
    of this encoder and of a random-init network beside it, BN as stored and recalibrated), else nothing."""
    if not isinstance(frozen, dict) or not isinstance(frozen.get("encoder"), dict):
        return []
    enc, rnd = frozen["encoder"], frozen.get("random_init") or {}
    lines = [
        "",
        "## Frozen features",
        "",
        f"On {frozen.get('data')}: {enc.get('n_train')} training images as kNN bank and probe training set, "
        f"{enc.get('n_test')} test images at {enc.get('image_size')} px (majority class accuracy "
        f"{_fmt(enc.get('majority_accuracy'), '.3f')}). Random init is a seeded ResNet50 measured the same "
        "way.",
        "",
        "| network | BN statistics | kNN accuracy | kNN AUC | probe accuracy | probe AUC | probe macro F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for who, res in (("this encoder", enc), ("random init", rnd)):
        for bn in ("stored", "recalibrated"):
            m = res.get(bn)
            if not isinstance(m, dict):
                continue
            knn, probe = m.get("knn") or {}, (m.get("linear_probe") or {}).get("test") or {}
            lines.append(
                f"| {who} | {bn} | {_fmt(knn.get('accuracy'), '.3f')} | {_fmt(knn.get('auc'), '.3f')} "
                f"| {_fmt(probe.get('accuracy'), '.3f')} | {_fmt(probe.get('auc'), '.3f')} "
                f"| {_fmt(probe.get('f1'), '.3f')} |"
            )
    return lines


def export_lines(onnx: Any) -> list[str]:
    """The card's "ONNX export" section from `metrics["onnx"]` (written by `cthub export`), else nothing."""
    if not isinstance(onnx, dict) or not onnx:
        return []
    lines = ["", "## ONNX export", ""]
    fp32, int8 = onnx.get("fp32"), onnx.get("int8")
    if isinstance(fp32, dict):
        par, ood = fp32.get("parity", {}), fp32.get("ood")
        lines.append(
            f"- `{fp32.get('file')}` (fp32, opset {fp32.get('opset')}, {fp32.get('exporter')} exporter, "
            f"sha256 `{str(fp32.get('sha256'))[:12]}...`): torch vs ONNX Runtime on {par.get('images')} "
            f"real images ({'; '.join(par.get('inputs', []))}): max |Δ logits| "
            f"{_fmt(par.get('max_abs_diff_logits'), '.1e')}, max |Δ CAM| "
            f"{_fmt(par.get('max_abs_diff_cam'), '.1e')}, top-1 agreement "
            f"{_fmt(par.get('top1_agreement'), '.4f')}."
        )
        if isinstance(ood, dict) and ood.get("stages"):  # graph version 3: the multi-layer score
            lines.append(
                f"- Out-of-distribution reference: {ood.get('method')} (probabilistic PCA of the pooled "
                f"features of each of {', '.join(ood['stages'])}, the largest z-score) over "
                f"{ood.get('n_reference')} {ood.get('data')} training images; threshold "
                f"{_fmt(ood.get('threshold'), '.4f')} = {_fmt(100 * float(ood.get('quantile', 0)), '.0f')}th "
                f"percentile of {ood.get('n_held_out')} held-out scores ({ood.get('n_validation')} "
                f"validation images, {ood.get('n_cross_fitted')} training images cross-fitted in "
                f"{ood.get('folds')} folds)."
            )
        elif isinstance(ood, dict):
            lines.append(
                f"- Out-of-distribution reference: {ood.get('method')} (rank {ood.get('rank')}) over "
                f"{ood.get('n_reference')} {ood.get('data')} training images; threshold "
                f"{_fmt(ood.get('threshold'), '.4f')} = {_fmt(100 * float(ood.get('quantile', 0)), '.0f')}th "
                f"percentile of {ood.get('n_held_out')} validation images."
            )
    if isinstance(int8, dict):
        a, b = int8.get("fp32", {}), int8.get("int8", {})
        lines.append(
            f"- `{int8.get('file')}` (int8 static QDQ, per-channel weights, calibrated on "
            f"{int8.get('calibration_images')} training images): on {int8.get('eval_images')} "
            f"{int8.get('data')} test images AUC {_fmt(a.get('auc'), '.4f')} -> {_fmt(b.get('auc'), '.4f')}"
            f" (Δ {_fmt(int8.get('delta_auc'), '+.4f')}), F1 {_fmt(a.get('f1'), '.4f')} -> "
            f"{_fmt(b.get('f1'), '.4f')} (Δ {_fmt(int8.get('delta_f1'), '+.4f')}), top-1 agreement with fp32 "
            f"{_fmt(int8.get('top1_agreement'), '.4f')} (always predicting fp32's commonest class: "
            f"{_fmt(int8.get('agreement_baseline'), '.4f')})."
        )
    return lines


def _op_text(op: Any) -> str:
    """'threshold t (rule): sensitivity s, specificity p[, 95% CI ...]' for an operating point record."""
    if not isinstance(op, dict):
        return ""
    text = (
        f"operating threshold {_fmt(op.get('threshold'), '.4f')} ({op.get('rule')}): sensitivity "
        f"{_fmt(op.get('sensitivity'), '.3f')}, specificity {_fmt(op.get('specificity'), '.3f')}"
    )
    ci = op.get("ci")
    if isinstance(ci, dict):

        def span(key: str) -> str:
            lo, hi = [*list(ci.get(key) or []), None, None][:2]
            return f"{key} {_fmt(lo, '.3f')}-{_fmt(hi, '.3f')}"

        text += (
            f" (95% bootstrap intervals over {ci.get('resamples')} resamples: "
            f"{', '.join(span(k) for k in ('threshold', 'sensitivity', 'specificity'))})"
        )
    return text


def calibration_lines(cal: Any) -> list[str]:
    """The card's "Calibration" section (fitted at training time) or "Recalibrated at SITE on N images"
    section from `metrics["calibration"]`, else nothing."""
    if not isinstance(cal, dict) or not isinstance(cal.get("temperature"), (int, float)):
        return []
    fit, ev = cal.get("fitted_on") or {}, cal.get("evaluated_on") or {}
    bins = cal.get("bins")
    if cal.get("site"):
        lines = ["", f"## Recalibrated at {cal['site']} on {fit.get('n')} images", ""]
        lines.append(
            f"- Temperature scaling refitted on all {fit.get('n')} labeled images of `{fit.get('data')}` "
            f"({fit.get('when')}): T {_fmt(cal.get('temperature_before'), '.4g')} -> "
            f"{_fmt(cal.get('temperature'), '.4g')}; calibration version {cal.get('version')} "
            f"(`{cal.get('id')}`)."
        )
        lines.append(
            f"- On that set, expected calibration error ({bins} equal-width bins, top label): "
            f"{_fmt(cal.get('ece_before'), '.4f')} before, {_fmt(cal.get('ece_after'), '.4f')} after "
            f"(the set it was fitted on), {_fmt(cal.get('ece_after_cross_validated'), '.4f')} "
            "cross-validated "
            f"({cal.get('cross_validation')}); NLL {_fmt(cal.get('nll_before'), '.4f')} -> "
            f"{_fmt(cal.get('nll_after'), '.4f')}."
        )
        prev = cal.get("previous")
        if isinstance(prev, dict):
            lines.append(
                f"- Replaces calibration version {prev.get('version')} (`{prev.get('id')}`, T "
                f"{_fmt(prev.get('temperature'), '.4g')}); the previous version's folder is kept unchanged."
            )
    else:
        lines = ["", "## Calibration", ""]
        if cal.get("method") == "none":
            lines.append(
                f"- Not calibrated: {cal.get('status')}; probabilities are the softmax of the logits."
            )
        else:
            lines.append(
                f"- Temperature scaling (T = {_fmt(cal.get('temperature'), '.4g')}) fitted on the "
                f"{fit.get('n')} {fit.get('split')} images of `{fit.get('data')}` ({fit.get('when')}); "
                "calibration version "
                f"{cal.get('version')} (`{cal.get('id')}`). Served probabilities are softmax(logits / T)."
            )
        lines.append(
            f"- On {ev.get('n')} {ev.get('split')} images, expected calibration error ({bins} equal-width "
            f"bins, top label): {_fmt(cal.get('ece_before'), '.4f')} before, "
            f"{_fmt(cal.get('ece_after'), '.4f')} after; "
            f"NLL {_fmt(cal.get('nll_before'), '.4f')} -> {_fmt(cal.get('nll_after'), '.4f')}."
        )
    if cal.get("operating_point"):
        lines.append(f"- Binary {_op_text(cal['operating_point'])}.")
    if cal.get("figure"):
        lines.append(f"- Reliability diagrams before and after: `{cal['figure']}`.")
    return lines


def ood_shift_lines(table: Any) -> list[str]:
    """The card's "Out of distribution, measured" section from `metrics["ood_shifts"]` (written by `cthub
    evaluate-ood --record`), else nothing."""
    if not isinstance(table, dict) or not table.get("rows"):
        return []
    thr = table.get("threshold")
    lines = [
        "",
        "## Out of distribution, measured",
        "",
        f"Score `{table.get('method')}`, threshold {_fmt(thr, '.4g')}; {table.get('n_in')} own test images, "
        f"{_fmt(100 * float(table.get('in_flagged') or 0), '.1f')}% above the threshold. AUROC: own test "
        "images against each shift (`cthub evaluate-ood`).",
        "",
        "| shift | far/near | n | AUROC | FPR at 95% TPR | flagged |",
        "|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        lines.append(
            f"| {r.get('name')} | {r.get('distance')} | {r.get('n')} | {_fmt(r.get('auroc'), '.3f')} | "
            f"{_fmt(r.get('fpr_at_95_tpr'), '.3f')} | {_fmt(100 * float(r.get('flagged') or 0), '.0f')}% |"
        )
    return lines


def render_card(cfg: ModelConfig) -> str:
    front = ["---", yaml.safe_dump(front_matter(cfg), sort_keys=False).rstrip(), "---"]
    pp = cfg.preprocessing
    lines = [
        f"# {cfg.name}",
        "",
        (
            f"- Architecture: {cfg.architecture}; pretraining: {METHOD_NAMES.get(cfg.method, cfg.method)}"
            f" on {cfg.pretraining_data}."
        ),
        "- Head: "
        + (
            "none (encoder, 2048-d pooled features)"
            if cfg.num_classes == 0
            else f"linear, {cfg.num_classes} classes"
        ),
        f"- Input: {pp.in_chans}x{pp.input_size}x{pp.input_size}, intensity mapping `{pp.mapping}`"
        + (f" ({pp.window or ''} {pp.window_center}/{pp.window_width})" if pp.mapping == "window" else "")
        + f", mean {list(pp.mean)}, std {list(pp.std)}.",
    ]
    if cfg.metrics.get("input_expectation"):  # `cthub quickstart` records what its task's model is shown
        lines.append(f"- Input expected: {cfg.metrics['input_expectation']}")
    if cfg.labels:
        lines.append(f"- Labels: {', '.join(cfg.labels)}")
    if cfg.threshold is not None:
        lines.append(f"- Operating threshold (chosen on validation): {cfg.threshold:.4f}")
    if cfg.provenance.get("citation"):
        lines += ["", f"**Citation.** {cfg.provenance['citation']}"]
    if cfg.provenance.get("note"):
        lines += ["", f"**Note.** {cfg.provenance['note']}"]
    lines += origin_lines(cfg.provenance)
    lines += study_lines(cfg.metrics.get("finetune_study"))
    lines += frozen_feature_lines(cfg.metrics.get("frozen_features"))
    lines += ["", "## Measured results", ""]
    measured = {k: v for k, v in cfg.metrics.items() if k != "onnx"}
    if measured:
        # everything the config records, verbatim (the sections above are read from it)
        body = ["```json", json.dumps(measured, indent=2, sort_keys=True), "```"]
        lines += ["<details><summary>All measurements (JSON)</summary>", "", *body, "", "</details>"]
    else:
        lines.append("Nothing has been measured for this model yet.")
    lines += comparison_lines(cfg)
    lines += calibration_lines(cfg.metrics.get("calibration"))
    lines += export_lines(cfg.metrics.get("onnx"))
    lines += ood_shift_lines(cfg.metrics.get("ood_shifts"))
    lines += ["", "## Provenance", ""]
    for k in (
        "command",
        "data",
        "source_file",
        "source_sha256",
        "wall_time_s",
        "epochs",
        "steps",
        "final_loss",
        "precision",
        "created",
    ):
        if k in cfg.provenance:
            lines.append(f"- {k}: `{cfg.provenance[k]}`")
    lines += _hardware_lines(cfg.provenance.get("hardware"))
    lines += _parent_lines(cfg.provenance.get("parent"))
    lines += ["", "Load it with `from hub import from_pretrained`.", ""]
    return "\n".join([*front, "", *lines])


def origin_lines(prov: dict[str, Any]) -> list[str]:
    """Where converted weights came from: the authors' file, its checksum, and the licence note."""
    origin = prov.get("origin")
    if not origin:
        return []
    lines = [
        "",
        "## Origin",
        "",
        f"Converted by {prov.get('converted_by', 'ct-ssl-hub')}: {origin.get('url')}"
        + (f" (linked from {origin['published_in']})" if origin.get("published_in") else "")
        + f", key layout `{origin.get('layout')}`.",
        "",
        f"- original file sha256: `{origin.get('sha256')}` ({origin.get('size')} bytes)",
    ]
    if prov.get("license_note"):
        lines.append(f"- licence: {prov['license_note']}")
    return lines


def _hardware_lines(hw: dict[str, Any] | None) -> list[str]:
    """Where the weights were computed: the same command gives the same weights only where the kernels agree
    (same CPU flags and overrides, same torch, same precision)."""
    if not hw:
        return []
    flags = " ".join(hw.get("flags") or []) or "none of note"
    env = "".join(f", {k}={v}" for k, v in (hw.get("kernel_env") or {}).items())
    gpu = f", {hw['cuda_device']}" if hw.get("cuda_device") else ""
    where = f"`{hw.get('cpu')}` ({hw.get('arch')}, {hw.get('cores')} cores; flags {flags}{env}{gpu})"
    return [f"- hardware: {where}, torch `{hw.get('torch')}`"]


def _parent_lines(parent: dict[str, Any] | None) -> list[str]:
    """The encoder a continued pretraining run started from (`cthub pretrain --init`), if any."""
    if not parent:
        return []
    method = METHOD_NAMES.get(str(parent.get("method")), parent.get("method") or "unknown method")
    ids = []
    if parent.get("digest"):
        ids.append(f"weights digest `{parent['digest']}`")
    if parent.get("sha256"):
        ids.append(f"file sha256 `{parent['sha256']}`")
    where = f" ({'; '.join(ids)})" if ids else ""
    return [f"- continued from: `{parent.get('name')}`, {method}{where}"]


def write_card(cfg: ModelConfig, directory: str | Path) -> Path:
    path = Path(directory) / CARD_NAME
    path.write_text(render_card(cfg))
    return path
