"""Real multi-process training: 2 CPU processes on gloo (DistributedDataParallel), every method.

After a few steps every rank must hold identical weights; MoCo's queue must hold keys from both ranks;
SwAV's Sinkhorn over two half batches must equal Sinkhorn over the whole batch.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from ctdata.datasets import load_medmnist

WORLD = 2
BATCH = 4
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, npz: str, out: str) -> None:
    import torch.distributed as dist

    from pretrain.config import build_method, config_for
    from pretrain.swav import sinkhorn
    from pretrain.trainer import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    images = load_medmnist(npz, "train").images[:64]
    report: dict = {}
    for method in ("mocov2", "swav", "byol", "spark"):
        kw = {
            "mocov2": {"queue_size": 40},
            "swav": {"n_prototypes": 16, "n_small": 2},
            "spark": {"decoder_width": 32},
            "byol": {"hidden": 64},
        }[method]
        cfg = config_for(
            method,
            None,
            out=f"{out}/{method}",
            image_size=64 if method == "spark" else 32,
            batch_size=BATCH,
            steps=STEPS,
            amp=False,
            tensorboard=False,
            log_every=1,
            method_kwargs=kw,
            warmup_steps=0,
        )
        res = train(cfg, images=images)
        state = res.method.state_dict()
        if method == "mocov2":  # MoCo keeps per-rank BN statistics (shuffle BN): compare the rest
            state = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var"))}
        gathered: list = [None] * WORLD
        dist.all_gather_object(gathered, {k: v.clone() for k, v in state.items()})
        if rank == 0:
            diff = max(
                float((gathered[0][k].float() - gathered[1][k].float()).abs().max())
                for k in state
                if state[k].numel()
            )
            torch.manual_seed(cfg.seed * 1000)  # the loop's rank-0 seed: the initial weights DDP broadcast
            init = build_method(cfg).encoder.state_dict()
            trained = res.encoder.state_dict()
            report[method] = {
                "max_diff": diff,
                "n_tensors": len(state),
                "changed": bool(not torch.equal(init["conv1.weight"], trained["conv1.weight"])),
            }
            if method == "mocov2":
                report[method]["queue_ptr"] = int(res.method.queue_ptr)
    g = torch.Generator().manual_seed(5)
    scores = torch.nn.functional.normalize(torch.randn(2 * BATCH, 6, generator=g), dim=1)
    local = sinkhorn(scores[rank * BATCH : (rank + 1) * BATCH])
    both: list = [None] * WORLD
    dist.all_gather_object(both, local)
    if rank == 0:
        report["sinkhorn_diff"] = float((torch.cat(both) - _single_sinkhorn(scores)).abs().max())
        torch.save(report, f"{out}/report.pt")
    dist.barrier()
    dist.destroy_process_group()


def _single_sinkhorn(scores: torch.Tensor) -> torch.Tensor:
    q = torch.exp(scores / 0.05).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(3):
        q /= q.sum(1, keepdim=True) * k
        q /= q.sum(0, keepdim=True) * b
    return (q * b).t()


def test_ddp_two_processes_identical_weights(organamnist_npz: Path, tmp_path: Path) -> None:
    load_medmnist(organamnist_npz, "train")  # the fixture's file is real and readable
    mp.spawn(_worker, args=(_free_port(), str(organamnist_npz), str(tmp_path)), nprocs=WORLD, join=True)
    report = torch.load(tmp_path / "report.pt", weights_only=False)
    for method in ("mocov2", "swav", "byol", "spark"):
        r = report[method]
        assert r["max_diff"] == 0.0, f"{method}: ranks diverged by {r['max_diff']}"
        assert r["changed"], f"{method}: training did not change the encoder"
    assert report["mocov2"]["queue_ptr"] == (WORLD * BATCH * STEPS) % 40  # keys from both ranks
    assert report["sinkhorn_diff"] < 1e-5
    assert np.isfinite(report["sinkhorn_diff"])


def _resume_worker(rank: int, port: int, npz: str, out: str) -> None:
    """MoCo under DDP (queue from both ranks, cross-rank key shuffle drawn from each rank's RNG): an
    interrupted-and-resumed run must end with the same weights, queue and losses as an uninterrupted one."""
    import torch.distributed as dist

    from pretrain.config import config_for
    from pretrain.trainer import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    images = load_medmnist(npz, "train").images[:64]

    def cfg(sub: str):
        return config_for(
            "mocov2",
            None,
            out=f"{out}/{sub}",
            image_size=32,
            batch_size=BATCH,
            steps=3,
            amp=False,
            tensorboard=False,
            log_every=1,
            warmup_steps=0,
            method_kwargs={"queue_size": 40},
        )

    full = train(cfg("full"), images=images)
    train(cfg("cut"), images=images, stop_at=1)
    resumed = train(cfg("cut"), images=images, resume=True)
    a, b = full.method.state_dict(), resumed.method.state_dict()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    losses = (full.losses[1:], resumed.losses)
    gathered: list = [None] * WORLD
    dist.all_gather_object(gathered, {"diff": diff, "losses": losses, "steps": resumed.steps})
    if rank == 0:
        torch.save(gathered, f"{out}/resume.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_resume_is_exact(organamnist_npz: Path, tmp_path: Path) -> None:
    mp.spawn(
        _resume_worker, args=(_free_port(), str(organamnist_npz), str(tmp_path)), nprocs=WORLD, join=True
    )
    for r in torch.load(tmp_path / "resume.pt", weights_only=False):
        assert r["steps"] == 3
        assert r["diff"] < 1e-5, f"resumed DDP run differs by {r['diff']}"
        np.testing.assert_allclose(r["losses"][0], r["losses"][1], rtol=1e-5)
