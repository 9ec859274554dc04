"""SparK (Tian et al., ICLR 2023): sparse masked modeling for CNNs on a plain ResNet50.

Random patch masking at the encoder's downsampling ratio (32), a sparse encoder, per-scale densify with
mask tokens, a light UNet decoder over the four scales and an L2 loss on per-patch normalized pixels at
masked patches only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cthub.errors import ConfigError
from hub.resnet import DOWNSAMPLE, STAGE_CHANNELS, ResNet50
from pretrain.augment import ViewSpec
from pretrain.base import SSLMethod
from pretrain.dist import convert_batchnorm, set_bn_sync
from pretrain.sparse import MaskContext, SparseBatchNorm2d, sparsify


def visible_patches(n: int, ratio: float) -> int:
    """How many of `n` patches a mask at `ratio` keeps visible: round(n * (1 - ratio)), at least one."""
    return max(1, round(n * (1 - ratio)))


def random_mask(
    b: int, fh: int, fw: int, ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B,1,fh,fw] bool, True = visible; exactly `visible_patches(fh*fw, ratio)` visible per image."""
    n = fh * fw
    keep = visible_patches(n, ratio)
    idx = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :keep].to(device)
    m = torch.zeros(b, n, dtype=torch.bool, device=device)
    m.scatter_(1, idx, True)
    return m.view(b, 1, fh, fw)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B,C,H,W] -> [B, L, p*p*C] with L = (H/p)(W/p), patches in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def masked_patch_loss(rec: torch.Tensor, target: torch.Tensor, active: torch.Tensor, p: int) -> torch.Tensor:
    """Mean squared error against per-patch normalized target pixels, over masked patches only."""
    inp, out = patchify(target.float(), p), patchify(rec.float(), p)
    mean = inp.mean(dim=-1, keepdim=True)
    std = (inp.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out - (inp - mean) / std) ** 2).mean(dim=2)  # [B, L]
    masked = (~active).view(active.shape[0], -1).to(per_patch.dtype)
    return (per_patch * masked).sum() / (masked.sum() + 1e-8)


class UNetBlock(nn.Module):
    """x2 transposed-conv upsampling, then conv3x3-BN-ReLU6-conv3x3-BN (SparK's LightDecoder block)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """Five x2 blocks from stride 32 to 1; encoder features added at strides 32/16/8/4."""

    def __init__(self, width: int = 512, out_chans: int = 3, up: int = DOWNSAMPLE) -> None:
        super().__init__()
        n = round(math.log2(up))
        self.channels = [width // 2**i for i in range(n + 1)]
        self.blocks = nn.ModuleList(
            UNetBlock(a, b) for a, b in zip(self.channels[:-1], self.channels[1:], strict=True)
        )
        self.proj = nn.Conv2d(self.channels[-1], out_chans, kernel_size=1)

    def forward(self, to_dec: list[torch.Tensor]) -> torch.Tensor:
        x: torch.Tensor | float = 0.0
        for i, block in enumerate(self.blocks):
            if i < len(to_dec):
                x = x + to_dec[i]
            x = block(x)
        return self.proj(x)


class SparK(SSLMethod):
    """Masked image modeling: the encoder sees only visible patches, the decoder fills in the rest."""

    name = "spark"

    def __init__(self, encoder: ResNet50, mask_ratio: float = 0.6, decoder_width: int = 512) -> None:
        super().__init__(encoder)
        self.mask_ratio = mask_ratio
        self.ctx = MaskContext()
        sparsify(self.encoder, self.ctx)
        widths = list(reversed(STAGE_CHANNELS))  # deep -> shallow: 2048, 1024, 512, 256
        self.decoder = LightDecoder(decoder_width, encoder.in_chans)
        dec = self.decoder.channels[: len(widths)]
        norms = [SparseBatchNorm2d(c) for c in widths]
        for m in norms:
            m.ctx = self.ctx
        self.densify_norms = nn.ModuleList(norms)
        self.densify_projs = nn.ModuleList(
            nn.Identity()
            if i == 0 and e == d
            else nn.Conv2d(e, d, 1 if i == 0 else 3, padding=0 if i == 0 else 1)
            for i, (e, d) in enumerate(zip(widths, dec, strict=True))
        )
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in widths)
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, mean=0.0, std=0.02, a=-0.02, b=0.02)

    def view_specs(self, size: int, hflip: bool) -> list[ViewSpec]:
        if size % DOWNSAMPLE:
            raise ConfigError(f"SparK needs an input size divisible by {DOWNSAMPLE}, got {size}")
        grid = size // DOWNSAMPLE
        if visible_patches(grid * grid, self.mask_ratio) >= grid * grid:
            raise ConfigError(
                f"SparK at {size} px has a {grid}x{grid} patch grid, where a mask ratio of {self.mask_ratio} "
                f"hides no patch and the loss is always 0: use a larger input ({2 * DOWNSAMPLE} px or more) "
                "or a higher mask ratio"
            )
        return [ViewSpec(size, scale=(0.67, 1.0), p_intensity=0.0, p_blur=0.0, p_hflip=0.5 if hflip else 0.0)]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """As the base class, but the mask tokens get no weight decay and no trust ratio (SparK's official
        code keeps `mask_token` out of weight decay; with decay and LAMB's trust ratio a zero-mean token of
        norm ~0.01 would not move)."""
        groups = super().param_groups(weight_decay)
        tokens = {id(t) for t in self.mask_tokens}
        groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in tokens]
        groups[1]["params"] = [p for p in groups[1]["params"] if id(p) not in tokens] + list(self.mask_tokens)
        return groups

    def prepare_distributed(self, sync: bool) -> None:
        convert_batchnorm(self.decoder, sync)
        set_bn_sync(self, sync)

    def forward(self, views: list[torch.Tensor], active: torch.Tensor | None = None) -> torch.Tensor:
        x = views[0]
        b, _, h, w = x.shape
        if active is None:
            active = random_mask(b, h // DOWNSAMPLE, w // DOWNSAMPLE, self.mask_ratio, x.device)
        self.ctx.active = active
        try:
            feats = self.encoder.forward_intermediates(
                x * self.ctx.at((h, w)).to(x.dtype), intermediates_only=True
            )
            to_dec, cur = [], active
            for i, f in enumerate(reversed(feats)):  # deep -> shallow
                f = self.densify_norms[i](f)
                f = torch.where(cur.expand_as(f), f, self.mask_tokens[i].to(f.dtype).expand_as(f))
                to_dec.append(self.densify_projs[i](f))
                cur = cur.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        finally:
            self.ctx.active = None
        rec = self.decoder(to_dec)
        return masked_patch_loss(rec, x, active, DOWNSAMPLE)
