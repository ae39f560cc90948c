"""Random resize-and-pad (Xie et al., ICLR 2018): shrink the image by a random factor and paste it at a
random offset on a zero canvas of the input size, so a perturbation no longer meets the patch grid where it
was optimised. Differentiable (bilinear resize), randomised: adaptive attacks use EOT.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DEFENSES, InputDefense, float_in_range


@DEFENSES.register()
class ResizePad(InputDefense):
    """Args: min_scale: smallest size ratio; each image draws a height in [min_scale * H, H] pixels (width in
    proportion) and an offset uniform over the remaining margin. seed: of the defense's own generator."""

    name = "resize_pad"
    paper = "Xie et al., Mitigating Adversarial Effects Through Randomization, ICLR 2018"
    randomized = True

    def __init__(self, min_scale: float = 0.9, seed: int = 0):
        self.min_scale = float_in_range(min_scale, "min_scale", 0.0, 1.0, low_open=True)
        self._seed(seed)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        _, _, h, w = pixels.shape
        out = []
        for image in pixels:
            sh = self._randint(max(1, round(self.min_scale * h)), h, 1)[0]
            sw = max(1, round(sh * w / h))
            top, left = self._randint(0, h - sh, 1)[0], self._randint(0, w - sw, 1)[0]
            small = F.interpolate(image.unsqueeze(0), size=(sh, sw), mode="bilinear", align_corners=False)
            out.append(F.pad(small, (left, w - sw - left, top, h - sh - top))[0])
        return torch.stack(out)
