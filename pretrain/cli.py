"""`cthub pretrain --method {mocov2,swav,byol,spark} --data PATH ...`: train, save, optionally publish."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cthub.errors import ConfigError
from pretrain.config import METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining of a ResNet50 CT encoder",
                       description="MoCoV2 / SwAV / BYOL / SparK on unlabeled CT slices. Multi-GPU/-node: "
                       "launch with `torchrun --nproc_per_node N -m cthub pretrain ...`.")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--data", required=True, help="MedMNIST .npz (train images), shard dir or image folder")
    p.add_argument("--recipe", default=None, help="YAML recipe (path or built-in: cpu-organamnist, lidc-paper)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per process and micro-batch")
    p.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation micro-batches")
    budget = p.add_argument_group("budget (the schedule spans --steps or --epochs; --max-minutes caps wall time)")
    budget.add_argument("--epochs", type=float, default=None)
    budget.add_argument("--steps", type=int, default=None)
    budget.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--out", default=None, help="run directory (checkpoint, metrics.csv, tb/, encoder/)")
    p.add_argument("--resume", action="store_true", help="continue exactly from RUN_DIR/checkpoint.pt")
    p.add_argument("--publish", default=None, metavar="NAME", help="write the encoder into the local hub")
    p.add_argument("--probe-data", default=None, help="labeled data for the card's linear probe "
                   "(default: --data when it is a MedMNIST npz)")
    p.add_argument("--probe-max-train", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="base learning rate per 256 images")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N slices")
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--hflip", action="store_true", default=None, help="random horizontal flips (off: laterality)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast on CPU / AMP on CUDA (auto: CUDA, or CPUs with native bf16)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_pretrain)


def describe_data(path: str, n: int) -> str:
    name = Path(path).name
    if "organamnist" in name.lower():
        return f"OrganAMNIST training images ({n:,} axial CT slices, 28x28, labels unused)"
    return f"{name} ({n:,} unlabeled CT slices)"


def _pretrain(a: argparse.Namespace) -> int:
    from pretrain.config import config_for
    from pretrain.dist import rank
    from pretrain.publish import publish
    from pretrain.trainer import train

    if a.publish and "lidc" in a.publish.lower() and "lidc" not in str(a.data).lower():
        raise ConfigError(f"refusing to name a model {a.publish!r}: it was not trained on LIDC-IDRI")
    out = a.out or f"runs/pretrain-{a.method}"
    amp = {"auto": None, "on": True, "off": False}[a.amp]
    cfg = config_for(a.method, a.recipe, data=a.data, out=out, image_size=a.image_size, batch_size=a.batch_size,
                     accum_steps=a.accum_steps, epochs=a.epochs, steps=a.steps, max_minutes=a.max_minutes,
                     threads=a.threads, seed=a.seed, base_lr=a.lr, max_images=a.max_images,
                     ckpt_every=a.ckpt_every, log_every=a.log_every, hflip=a.hflip, amp=amp,
                     channels_last=False if a.no_channels_last else None, device=a.device)
    result = train(cfg, resume=a.resume)
    if rank() != 0:
        return 0
    command = "cthub " + " ".join(shlex.quote(x) for x in sys.argv[1:]) if sys.argv else "cthub pretrain"
    from hub.io import save_pretrained
    from pretrain.publish import model_config

    desc = describe_data(a.data, result.n_images)
    enc_dir = save_pretrained(result.encoder, Path(out) / "encoder",
                              model_config(result, cfg, name=f"{a.method}-run", data_desc=desc, command=command))
    print(f"encoder saved to {enc_dir} (final loss {result.final_loss:.4f}, {result.steps} steps, "
          f"{result.wall_time_s / 60:.1f} min)")
    if a.publish:
        probe = a.probe_data or (a.data if str(a.data).endswith(".npz") else None)
        folder = publish(result, cfg, a.publish, data_desc=desc, command=command, probe_source=probe,
                         probe_max_train=a.probe_max_train)
        print(f"published {a.publish} -> {folder}")
    return 0
