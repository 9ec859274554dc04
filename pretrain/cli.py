"""`cthub pretrain --method {mocov2,swav,byol,spark} --data PATH ...`: train, save, optionally publish."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cthub.errors import ConfigError, ModelNotFoundError
from cthub.provenance import command_line
from pretrain.names import METHOD_NAMES

if TYPE_CHECKING:
    from cthub.cli import SubParsers


def register(sub: SubParsers) -> None:
    _register_pretrain(sub)
    _register_evaluate(sub)
    _register_report(sub)


def _register_pretrain(sub: SubParsers) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining of a ResNet50 CT encoder",
        description="MoCoV2 / SwAV / BYOL / SparK on unlabeled CT slices. Multi-GPU/-node: "
        "launch with `torchrun --nproc_per_node N -m cthub pretrain ...`.",
    )
    p.add_argument("--method", required=True, choices=METHOD_NAMES)
    p.add_argument("--data", required=True, help="MedMNIST .npz (train images), shard dir or image folder")
    p.add_argument(
        "--recipe",
        default=None,
        help="YAML recipe (path or built-in: cpu-organamnist, cpu-organamnist-from-spark, lidc-paper)",
    )
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per process and micro-batch")
    p.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation micro-batches")
    budget = p.add_argument_group(
        "budget (the schedule spans --steps or --epochs; --max-minutes caps wall time)"
    )
    budget.add_argument("--epochs", type=float, default=None)
    budget.add_argument("--steps", type=int, default=None)
    budget.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--out", default=None, help="run directory (checkpoint, metrics.csv, tb/, encoder/)")
    p.add_argument("--resume", action="store_true", help="continue exactly from RUN_DIR/checkpoint.pt")
    p.add_argument("--publish", default=None, metavar="NAME", help="write the encoder into the local hub")
    p.add_argument(
        "--probe-data",
        default=None,
        help="labeled data for the card's linear probe (default: --data when it is a MedMNIST npz)",
    )
    p.add_argument("--probe-max-train", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="base learning rate per 256 images")
    p.add_argument("--optimizer", default=None, choices=("sgd", "lars", "lamb", "adamw"))
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument(
        "--init",
        default=None,
        metavar="NAME|PATH",
        help="continue from a hub encoder (hierarchical pretraining); the card records the parent",
    )
    p.add_argument(
        "--monitor-data",
        default=None,
        help="labeled npz for the online kNN monitor "
        "(default: --data when it is a MedMNIST npz; 'none' turns it off)",
    )
    p.add_argument("--monitor-every", type=int, default=None, help="steps between kNN checks")
    p.add_argument("--monitor-size", type=int, default=None, help="kNN bank and query images each")
    p.add_argument("--no-prefetch", action="store_true", help="build views on the training thread")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N slices")
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument(
        "--hflip", action="store_true", default=None, help="random horizontal flips (off: laterality)"
    )
    p.add_argument(
        "--amp",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast on CPU / AMP on CUDA (auto: CUDA, or CPUs with native bf16)",
    )
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_pretrain)


def _register_evaluate(sub: SubParsers) -> None:
    e = sub.add_parser(
        "evaluate",
        help="frozen-feature quality of any encoder: kNN, linear probe, collapse",
        description="Offline evaluation of an encoder (hub name or folder, or 'scratch' for a "
        "random-init ResNet50): weighted kNN (k=20, cosine) with the training images as bank, "
        "a linear probe (C chosen on val) and the collapse statistic, with BatchNorm as stored and "
        "re-estimated on clean training images, and the majority-class accuracy for reference.",
    )
    e.add_argument("encoder", nargs="+", help="hub name(s), folder(s), or 'scratch'")
    e.add_argument("--data", required=True, help="labeled MedMNIST .npz with train/val/test splits")
    e.add_argument("--image-size", type=int, default=None, help="default: the encoder's own input size")
    e.add_argument("--max-train", type=int, default=2000, help="stratified training (bank) images")
    e.add_argument("--max-test", type=int, default=4000)
    e.add_argument("--k", type=int, default=20)
    e.add_argument("--bn", choices=("both", "stored", "recalibrated"), default="both")
    e.add_argument("--no-probe", action="store_true", help="kNN and collapse only")
    e.add_argument("--seed", type=int, default=42)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--json", default=None, help="write the results here")
    e.set_defaults(func=_evaluate)


def _register_report(sub: SubParsers) -> None:
    r = sub.add_parser(
        "pretrain-report",
        help="table + kNN-monitor curves of pretraining runs (docs/results)",
        description="Summarize run directories (checkpoint.pt, metrics.csv, monitor.csv) into "
        "pretrain-runs.md/.json and knn-monitor.png. Reports only what the runs logged.",
    )
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument("--out", default="docs/results")
    r.set_defaults(func=_report)


def describe_data(path: str, n: int) -> str:
    name = Path(path).name
    if "organamnist" in name.lower():
        return f"OrganAMNIST training images ({n:,} axial CT slices, 28x28, labels unused)"
    return f"{name} ({n:,} unlabeled CT slices)"


def _pretrain(a: argparse.Namespace) -> int:
    from pretrain.config import config_for
    from pretrain.dist import rank
    from pretrain.publishing import publish
    from pretrain.trainer import train

    if a.publish and "lidc" in a.publish.lower() and "lidc" not in str(a.data).lower():
        raise ConfigError(f"refusing to name a model {a.publish!r}: it was not trained on LIDC-IDRI")
    out = a.out or f"runs/pretrain-{a.method}"
    amp = {"auto": None, "on": True, "off": False}[a.amp]
    monitor = a.monitor_data or (a.data if str(a.data).endswith(".npz") else None)
    cfg = config_for(
        a.method,
        a.recipe,
        data=a.data,
        out=out,
        image_size=a.image_size,
        batch_size=a.batch_size,
        accum_steps=a.accum_steps,
        epochs=a.epochs,
        steps=a.steps,
        max_minutes=a.max_minutes,
        threads=a.threads,
        seed=a.seed,
        base_lr=a.lr,
        max_images=a.max_images,
        ckpt_every=a.ckpt_every,
        log_every=a.log_every,
        hflip=a.hflip,
        amp=amp,
        channels_last=False if a.no_channels_last else None,
        device=a.device,
        optimizer=a.optimizer,
        weight_decay=a.weight_decay,
        warmup_steps=a.warmup_steps,
        init=a.init,
        monitor_data=None if monitor in (None, "none") else monitor,
        monitor_every=a.monitor_every,
        monitor_size=a.monitor_size,
        prefetch=False if a.no_prefetch else None,
    )
    result = train(cfg, resume=a.resume)
    if rank() != 0:
        return 0
    command = command_line("pretrain", a)
    from hub.io import save_pretrained
    from pretrain.publishing import model_config

    desc = describe_data(a.data, result.n_images)
    enc_dir = save_pretrained(
        result.encoder,
        Path(out) / "encoder",
        model_config(result, cfg, name=f"{a.method}-run", data_desc=desc, command=command),
    )
    print(
        f"encoder saved to {enc_dir} (final loss {result.final_loss:.4f}, {result.steps} steps, "
        f"{result.wall_time_s / 60:.1f} min)"
    )
    if a.publish:
        probe = a.probe_data or (a.data if str(a.data).endswith(".npz") else None)
        folder = publish(
            result,
            cfg,
            a.publish,
            data_desc=desc,
            command=command,
            probe_source=probe,
            probe_max_train=a.probe_max_train,
        )
        print(f"published {a.publish} -> {folder}")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    import json

    from ctdata.labeled import limit, load_splits
    from finetune.evaluate import evaluate_encoder

    splits = load_splits(a.data)
    if not {"train", "val", "test"} <= set(splits):
        raise ConfigError(f"{a.data}: evaluation needs train/val/test splits")
    train, val = limit(splits["train"], a.max_train, a.seed), limit(splits["val"], a.max_train, a.seed)
    test = limit(splits["test"], a.max_test, a.seed)
    modes = ("stored", "recalibrated") if a.bn == "both" else (a.bn,)
    results = []
    for name in a.encoder:
        try:
            encoder, own_size = _load_encoder(name)
        except ModelNotFoundError as e:  # `make evaluate` names every encoder the recipes can make
            print(f"cthub evaluate: skipping {name!r}: not available here ({e})")
            continue
        size = a.image_size or own_size
        r = evaluate_encoder(
            encoder,
            train,
            val,
            test,
            image_size=size,
            k=a.k,
            bn_modes=modes,
            probe=not a.no_probe,
            seed=a.seed,
            threads=a.threads,
        )
        results.append(r)
        for mode in modes:
            m = r[mode]
            probe = m.get("linear_probe", {}).get("test", {})
            print(
                f"{r['encoder']:<28} BN {mode:<12} kNN acc {m['knn']['accuracy']:.3f} "
                f"auc {m['knn']['auc']:.3f}"
                + (f" | probe acc {probe['accuracy']:.3f} auc {probe['auc']:.3f}" if probe else "")
                + f" | collapse {m['collapse_std']:.2f} | majority {r['majority_accuracy']:.3f}"
            )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


def _load_encoder(name: str) -> tuple[Any, int]:
    """The encoder (loaded and verified once) and its own training input size; scratch stays a name (64 px,
    the CPU recipes' size)."""
    from finetune.train import SCRATCH_NAMES
    from hub import from_pretrained

    if name.lower() in SCRATCH_NAMES:
        return name, 64
    enc = from_pretrained(name, num_classes=0)
    return enc, int(enc.config.preprocessing.input_size)


def _report(a: argparse.Namespace) -> int:
    from pretrain.report import write_report

    for kind, path in write_report(a.runs, a.out, command=command_line("pretrain-report", a)).items():
        print(f"{kind}: {path}")
    return 0
