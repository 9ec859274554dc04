"""Model cards: README.md with YAML front matter that the Hugging Face Hub understands.

A card states only what was measured: the metrics in `config.metrics`, on the data and by the command
recorded in `config.provenance`. Nothing is claimed that the config does not carry.
"""

from __future__ import annotations

import json
from pathlib import Path

from hub.config import CARD_NAME, ModelConfig

METHOD_NAMES = {
    "spark": "SparK (sparse masked modeling for CNNs)",
    "mocov2": "MoCo v2",
    "swav": "SwAV",
    "byol": "BYOL",
    "supervised": "supervised",
    "random": "none (random initialisation)",
}


def render_card(cfg: ModelConfig) -> str:
    front = [
        "---",
        "library_name: ct-ssl-hub",
        f"license: {cfg.provenance.get('license', 'other')}",
        "tags:",
        "- medical-imaging",
        "- computed-tomography",
        "- self-supervised",
        f"- {cfg.method}",
        f"- {cfg.architecture}",
    ]
    if cfg.provenance.get("datasets"):
        front.append("datasets:")
        front += [f"- {d}" for d in cfg.provenance["datasets"]]
    front.append("---")
    pp = cfg.preprocessing
    lines = [
        f"# {cfg.name}",
        "",
        f"- Architecture: {cfg.architecture}; pretraining: {METHOD_NAMES.get(cfg.method, cfg.method)}"
        f" on {cfg.pretraining_data}.",
        f"- Head: {'none (encoder, 2048-d pooled features)' if cfg.num_classes == 0 else f'linear, {cfg.num_classes} classes'}",
        f"- Input: {pp.in_chans}x{pp.input_size}x{pp.input_size}, intensity mapping `{pp.mapping}`"
        + (f" ({pp.window or ''} {pp.window_center}/{pp.window_width})" if pp.mapping == "window" else "")
        + f", mean {list(pp.mean)}, std {list(pp.std)}.",
    ]
    if cfg.labels:
        lines.append(f"- Labels: {', '.join(cfg.labels)}")
    if cfg.threshold is not None:
        lines.append(f"- Operating threshold (chosen on validation): {cfg.threshold:.4f}")
    if cfg.provenance.get("note"):
        lines += ["", f"**Note.** {cfg.provenance['note']}"]
    lines += ["", "## Measured results", ""]
    if cfg.metrics:
        lines += ["```json", json.dumps(cfg.metrics, indent=2, sort_keys=True), "```"]
    else:
        lines.append("Nothing has been measured for this model yet.")
    lines += ["", "## Provenance", ""]
    for k in ("command", "data", "wall_time_s", "epochs", "steps", "final_loss", "created"):
        if k in cfg.provenance:
            lines.append(f"- {k}: `{cfg.provenance[k]}`")
    lines += ["", "Load it with `from hub import from_pretrained`.", ""]
    return "\n".join(front + [""] + lines)


def write_card(cfg: ModelConfig, directory: str | Path) -> Path:
    path = Path(directory) / CARD_NAME
    path.write_text(render_card(cfg))
    return path
