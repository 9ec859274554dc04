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
    if cfg.labels:
        lines.append(f"- Labels: {', '.join(cfg.labels)}")
    if cfg.threshold is not None:
        lines.append(f"- Operating threshold (chosen on validation): {cfg.threshold:.4f}")
    if cfg.provenance.get("citation"):
        lines += ["", f"**Citation.** {cfg.provenance['citation']}"]
    if cfg.provenance.get("note"):
        lines += ["", f"**Note.** {cfg.provenance['note']}"]
    lines += ["", "## Measured results", ""]
    if cfg.metrics:
        lines += ["```json", json.dumps(cfg.metrics, indent=2, sort_keys=True), "```"]
    else:
        lines.append("Nothing has been measured for this model yet.")
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
        "created",
    ):
        if k in cfg.provenance:
            lines.append(f"- {k}: `{cfg.provenance[k]}`")
    lines += ["", "Load it with `from hub import from_pretrained`.", ""]
    return "\n".join([*front, "", *lines])


def write_card(cfg: ModelConfig, directory: str | Path) -> Path:
    path = Path(directory) / CARD_NAME
    path.write_text(render_card(cfg))
    return path
