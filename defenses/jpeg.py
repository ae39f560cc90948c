"""JPEG re-encoding (Dziugaite et al. 2016; Guo et al., ICLR 2018): compression removes part of a
high-frequency perturbation. Forward: a real JPEG round trip through PIL at ``quality``; backward: the
identity (BPDA, the surrogate Athalye et al. 2018 use to break it).
"""
from __future__ import annotations

import io

import numpy as np
import torch

from .base import DEFENSES, InputDefense, int_in_range, straight_through


def jpeg_round_trip(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image of (B, 3, H, W) in [0, 1] saved as an 8-bit JPEG at ``quality`` and decoded again."""
    from PIL import Image

    out = []
    for image in pixels.detach().cpu().float():
        array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        out.append(torch.from_numpy(decoded.copy()).permute(2, 0, 1))
    return (torch.stack(out).float() / 255).to(pixels.device, pixels.dtype)


@DEFENSES.register()
class JPEG(InputDefense):
    """Args: quality: PIL JPEG quality, 1..95."""

    name = "jpeg"
    paper = "Guo et al., Countering Adversarial Images using Input Transformations, ICLR 2018"
    differentiable = False
    bpda = "identity (straight-through)"

    def __init__(self, quality: int = 75):
        self.quality = int_in_range(quality, "quality", 1, 95)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return straight_through(pixels, lambda x: jpeg_round_trip(x, self.quality))
