"""Optimizers of the recipes (LARS, LAMB; SGD and AdamW from torch) and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch

from cthub.errors import ConfigError

OPTIMIZERS = ("sgd", "lars", "lamb", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio eta*||w||/(||g|| + wd*||w||) (You et al. 2017).

    Groups with `lars=False` (biases, norms) get neither the trust ratio nor weight decay, as in BYOL/SwAV.
    """

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001
    ) -> None:
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "lars": True}
        )

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["lars"]:
                    d = d.add(p, alpha=g["weight_decay"])
                    wn, gn = torch.linalg.norm(p), torch.linalg.norm(p.grad)
                    trust = torch.where(
                        (wn > 0) & (gn > 0),
                        g["eta"] * wn / (gn + g["weight_decay"] * wn),
                        torch.ones_like(wn),
                    )
                    d = d.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(d).detach()
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


class LAMB(torch.optim.Optimizer):
    """Adam moments with decoupled weight decay and a layer-wise trust ratio ||w||/||update||
    (You et al. 2020)."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "lars": True}
        )

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                mh = st["m"] / (1 - b1 ** st["step"])
                vh = st["v"] / (1 - b2 ** st["step"])
                u = mh / (vh.sqrt() + g["eps"])
                if g["weight_decay"]:
                    u = u.add(p, alpha=g["weight_decay"])
                wn, un = torch.linalg.norm(p), torch.linalg.norm(u)
                trust = torch.where((wn > 0) & (un > 0), wn / un, torch.ones_like(wn)) if g["lars"] else 1.0
                p.add_(u * trust, alpha=-g["lr"])


def build_optimizer(
    name: str,
    groups: list[dict],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """One of `OPTIMIZERS`; `groups` come from `SSLMethod.param_groups` (each keeps its own weight decay)."""
    for g in groups:
        g.setdefault("base_weight_decay", g["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def cosine(step: int, total: int, start: float, end: float) -> float:
    t = min(max(step, 0), max(total, 1)) / max(total, 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def lr_at(step: int, total: int, warmup: int, base: float, final: float = 0.0) -> float:
    """Linear warm-up from 0 to `base` over `warmup` steps, then cosine to `final`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return cosine(step - warmup, total - warmup, base, final)


def apply_schedule(opt: torch.optim.Optimizer, lr: float, wd_factor: float) -> None:
    """Set the lr of every group and scale each group's own weight decay (0 stays 0)."""
    for g in opt.param_groups:
        g["lr"] = lr
        g["weight_decay"] = g["base_weight_decay"] * wd_factor
