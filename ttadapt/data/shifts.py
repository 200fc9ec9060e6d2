"""Distribution shifts in the style of ImageNet-C (Hendrycks & Dietterich, 2019), in torch.

Each shift maps images in [0, 1] — one ``(C, H, W)`` image or a batch ``(N, C, H, W)``, C = 1 or
3 — to images in [0, 1] of the same shape, at severity 1–5, deterministically given ``seed``.
Severity constants follow ImageNet-C; spatial ones (blur radii, pixel block sizes) are scaled
by ``min(H, W) / 224`` (at least 1/2) so that a 28×28 digit and a 224×224 photo are hurt alike.

    >>> from ttadapt.data import shifts
    >>> x_shifted = shifts.apply(x, "gaussian_noise", severity=3, seed=0)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SHIFTS", "apply", "list_shifts"]

_GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT_NOISE = (60, 25, 12, 5, 3)
_IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
_DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # (disk radius, alias blur σ) at 224 px
_GAUSSIAN_BLUR = (1, 2, 3, 4, 6)  # σ at 224 px
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
_JPEG = (25, 18, 15, 10, 7)


def _scale(x: Tensor) -> float:
    return max(min(x.shape[-2:]) / 224.0, 0.5)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def gaussian_noise(x: Tensor, severity: int, seed: int) -> Tensor:
    noise = torch.randn(x.shape, generator=_generator(seed)).to(x)
    return (x + noise * _GAUSSIAN_NOISE[severity - 1]).clamp(0, 1)


def shot_noise(x: Tensor, severity: int, seed: int) -> Tensor:
    c = _SHOT_NOISE[severity - 1]
    rates = (x.detach().cpu().double() * c).clamp(min=0)
    return (torch.poisson(rates, generator=_generator(seed)) / c).to(x).clamp(0, 1)


def impulse_noise(x: Tensor, severity: int, seed: int) -> Tensor:
    """Salt and pepper: a fraction ``c`` of the values set to 0 or 1 (half each)."""
    g = _generator(seed)
    u = torch.rand(x.shape, generator=g).to(x.device)
    salt = torch.rand(x.shape, generator=g).to(x.device) < 0.5
    c = _IMPULSE_NOISE[severity - 1]
    hit = u < c
    return torch.where(hit & salt, torch.ones_like(x), torch.where(hit, torch.zeros_like(x), x))


def _blur(x: Tensor, kernel: Tensor) -> Tensor:
    """Depthwise 2-D convolution with reflect padding."""
    k = kernel.to(x)
    c = x.shape[1]
    pad_h, pad_w = k.shape[0] // 2, k.shape[1] // 2
    mode = "reflect" if min(x.shape[-2:]) > max(pad_h, pad_w) else "replicate"
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=mode)
    return F.conv2d(padded, k.expand(c, 1, *k.shape), groups=c)


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def gaussian_blur(x: Tensor, severity: int, seed: int) -> Tensor:
    return _blur(x, _gaussian_kernel(_GAUSSIAN_BLUR[severity - 1] * _scale(x))).clamp(0, 1)


def defocus_blur(x: Tensor, severity: int, seed: int) -> Tensor:
    radius, alias = _DEFOCUS[severity - 1]
    s = _scale(x)
    radius = max(radius * s, 1.0)
    size = int(math.ceil(radius))
    t = torch.arange(-size, size + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    out = _blur(x, disk.float())
    return _blur(out, _gaussian_kernel(max(alias * s, 0.1))).clamp(0, 1) if alias * s >= 0.1 else out.clamp(0, 1)


def contrast(x: Tensor, severity: int, seed: int) -> Tensor:
    c = _CONTRAST[severity - 1]
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


def brightness(x: Tensor, severity: int, seed: int) -> Tensor:
    """Add ``c`` to the HSV value channel (exactly: scale RGB by V′/V, hue and saturation kept)."""
    c = _BRIGHTNESS[severity - 1]
    if x.shape[1] == 1:
        return (x + c).clamp(0, 1)
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + c).clamp(max=1)
    ratio = torch.where(value > 0, new_value / value.clamp(min=1e-12), torch.zeros_like(value))
    return torch.where(value > 0, x * ratio, new_value.expand_as(x)).clamp(0, 1)


def pixelate(x: Tensor, severity: int, seed: int) -> Tensor:
    h, w = x.shape[-2:]
    c = _PIXELATE[severity - 1]
    if min(h, w) < 64:  # small images: the same relative loss of detail, in whole blocks
        c = c * 0.75
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest").clamp(0, 1)


def jpeg(x: Tensor, severity: int, seed: int) -> Tensor:
    """Round trip through JPEG at ImageNet-C's quality for the severity (Pillow's encoder)."""
    import io

    import numpy as np
    from PIL import Image

    quality = _JPEG[severity - 1]
    out = []
    for img in x:
        u8 = (img.detach().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        array = u8[0].numpy() if u8.shape[0] == 1 else u8.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded = torch.from_numpy(np.array(Image.open(buffer)))
        decoded = decoded.unsqueeze(0) if decoded.dim() == 2 else decoded.permute(2, 0, 1)
        out.append(decoded.to(x.dtype) / 255)
    return torch.stack(out).to(x.device)


SHIFTS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg": jpeg,
}


def list_shifts() -> list[str]:
    return list(SHIFTS)


def apply(x: Tensor, shift: str, severity: int = 3, seed: int = 0) -> Tensor:
    """Apply ``shift`` at ``severity`` (1–5) to an image ``(C, H, W)`` or batch ``(N, C, H, W)``
    with values in [0, 1]. Same ``seed``, same result."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; available: {', '.join(SHIFTS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() not in (3, 4):
        raise ValueError("shifts take float images (C, H, W) or batches (N, C, H, W) with values in [0, 1]")
    if x.shape[-3] not in (1, 3):
        raise ValueError(f"shifts take 1- or 3-channel images, got {x.shape[-3]} channels")
    single = x.dim() == 3
    batch = x.unsqueeze(0) if single else x
    out = SHIFTS[shift](batch, severity, seed)
    return out.squeeze(0) if single else out


