"""Grad-CAM at the stride-16 stage, written as forward operations so that it can live in an exported graph.

Grad-CAM (Selvaraju et al.) weights each channel of a stage's activations A by the spatial mean of the
gradient of a class score with respect to A, sums, and keeps the positive part. At the last stage (stride 32:
2x2 at 64 px, 7x7 at 224 px) that gradient is the linear head's weight row and Grad-CAM is the CAM of the
GAP + linear head. One stage earlier (layer3, stride 16: 14x14 at 224 px) the gradient passes back through
layer4, and ONNX has no autograd, so `stride16_grad_cam` writes that backward pass out: layer4's forward
keeps its ReLU masks, then the input gradient runs back through the transposed convolutions of layer4's own
weights and the eval-mode BatchNorm scales. For every class at once (the classes ride in the batch), the
result equals torch autograd's Grad-CAM at layer3 (`reference_grad_cam`) up to float rounding.

Cost: one input-gradient pass through layer4 per class, about layer4's forward (~0.8 of ResNet50's
~4.1 GMAC at 224 px): +40% for a two-class model, more with many classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hub.resnet import Bottleneck, ResNet50

Saved = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """d bn(x) / dx in eval mode, per channel, shaped to broadcast over [N, C, H, W]."""
    assert bn.running_var is not None and bn.weight is not None
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps))[None, :, None, None]


def _block_forward(block: Bottleneck, x: torch.Tensor) -> tuple[torch.Tensor, Saved]:
    """`Bottleneck.forward`, keeping the post-ReLU activations its input gradient needs."""
    identity = x if block.downsample is None else block.downsample(x)
    a1 = F.relu(block.bn1(block.conv1(x)))
    a2 = F.relu(block.bn2(block.conv2(a1)))
    out = F.relu(block.bn3(block.conv3(a2)) + identity)
    return out, (a1, a2, out)


def _transpose(g: torch.Tensor, conv: nn.Conv2d, like: torch.Tensor) -> torch.Tensor:
    """d conv(x) / dx applied to `g`: the transposed convolution, sized back to `like` ([N, C, H, W])."""
    stride, padding = int(conv.stride[0]), int(conv.padding[0])
    k = int(conv.kernel_size[0])
    extra = int(like.shape[-1]) - ((int(g.shape[-1]) - 1) * stride - 2 * padding + k)
    return F.conv_transpose2d(g, conv.weight, stride=stride, padding=padding, output_padding=extra)


def _block_backward(block: Bottleneck, x: torch.Tensor, saved: Saved, g: torch.Tensor) -> torch.Tensor:
    """d loss / d x of one bottleneck, given d loss / d out (`g`) and what `_block_forward` kept (`x`, the
    block's input, gives only the size to return to)."""
    a1, a2, out = saved
    g = g * (out > 0).to(g.dtype)
    main = _transpose(g * _bn_scale(block.bn3), block.conv3, a2)
    main = _transpose(main * (a2 > 0).to(g.dtype) * _bn_scale(block.bn2), block.conv2, a1)
    main = _transpose(main * (a1 > 0).to(g.dtype) * _bn_scale(block.bn1), block.conv1, x)
    if block.downsample is None:
        return main + g
    conv, bn = list(block.downsample.children())
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    return main + _transpose(g * _bn_scale(bn), conv, x)


def stride16_grad_cam(model: ResNet50, fc: nn.Linear, a3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer4's output [B, 2048, h, w], Grad-CAM maps of every class at layer3 [B, K, 2h, 2w], before ReLU)
    from layer3's output `a3` [B, 1024, 2h, 2w]. The logits are `model.forward_head(layer4 output)`."""
    blocks = [b for b in model.layer4 if isinstance(b, Bottleneck)]
    inputs, saves = [], []
    x = a3
    for block in blocks:
        inputs.append(x)
        x, saved = _block_forward(block, x)
        saves.append(saved)
    b, c, h, w = x.shape
    k = fc.weight.shape[0]
    # d logit_k / d layer4 output = W[k] / (h w) at every position; the K classes ride in the batch
    g = (fc.weight / (h * w))[None, :, :, None, None].expand(b, k, c, h, w).reshape(b * k, c, h, w)

    def per_class(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(k, dim=0)

    for block, inp, saved in zip(reversed(blocks), reversed(inputs), reversed(saves), strict=True):
        g = _block_backward(block, inp, (per_class(saved[0]), per_class(saved[1]), per_class(saved[2])), g)
    alpha = g.mean(dim=(2, 3)).reshape(b, k, -1)  # [B, K, 1024]: Grad-CAM's channel weights
    return x, torch.einsum("bkc,bchw->bkhw", alpha, a3)


def reference_grad_cam(model: ResNet50, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM at layer3 of every class by torch autograd, before ReLU ([B, K, H/16, W/16]): what
    `stride16_grad_cam` must equal."""
    model.eval()
    with torch.enable_grad():
        a3 = model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        a3 = a3.detach().requires_grad_(True)
        logits = model.forward_head(model.layer4(a3))
        maps = []
        for k in range(logits.shape[1]):
            (grad,) = torch.autograd.grad(logits[:, k].sum(), a3, retain_graph=True)
            maps.append((grad.mean(dim=(2, 3), keepdim=True) * a3).sum(1))
    return torch.stack(maps, dim=1).detach()
