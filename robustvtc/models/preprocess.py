"""Bring user images to a model's input resolution in torch, once, before any attack.

HF image processors resize in PIL; doing it in torch keeps one pixel space for every family: (B, 3, H, W)
floats in [0, 1] at the resolution the adapter takes, where attacks measure epsilon. Everything after it
(normalisation, LLaVA-NeXT crops, Qwen2-VL patches) happens inside the adapters, differentiably.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..images import to_pixels


def native_size(image: Any) -> tuple[int, int]:
    """(H, W) of an image as given; (0, 0) when unreadable, so :func:`to_pixels` reports the problem itself."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        try:
            with Image.open(image) as im:
                return im.size[1], im.size[0]
        except Exception:  # noqa: BLE001 - unreadable, truncated, a decompression bomb: to_pixels names it
            return 0, 0
    if type(image).__module__.startswith("PIL."):
        return image.size[1], image.size[0]
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return image.shape[0], image.shape[1]
    if isinstance(image, torch.Tensor) and image.dim() >= 2:
        return image.shape[-2], image.shape[-1]
    return 0, 0


def fit_image(image: Any, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: the shorter side scaled so the image covers ``size`` (bicubic, antialiased),
    then centre-cropped -- CLIP's resize-and-crop, done in torch."""
    pixels = to_pixels(image, native_size(image)).float()
    h, w = size
    scale = max(h / pixels.shape[-2], w / pixels.shape[-1])
    new = (max(h, round(pixels.shape[-2] * scale)), max(w, round(pixels.shape[-1] * scale)))
    if new != tuple(pixels.shape[-2:]):
        pixels = F.interpolate(pixels, size=new, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new[0] - h) // 2, (new[1] - w) // 2
    return pixels[..., top:top + h, left:left + w].contiguous()
