"""Bit-depth reduction (feature squeezing, Xu et al., NDSS 2018): rounding every channel to ``bits`` bits
erases perturbations smaller than half a quantisation step. Rounding has zero gradient almost everywhere,
so the backward pass is the identity (BPDA).
"""
from __future__ import annotations

import torch

from .base import DEFENSES, InputDefense, int_in_range, straight_through


@DEFENSES.register()
class BitDepth(InputDefense):
    """Args: bits: bits per channel kept, 1..8."""

    name = "bit_depth"
    paper = "Xu et al., Feature Squeezing, NDSS 2018"
    differentiable = False
    bpda = "identity (straight-through)"

    def __init__(self, bits: int = 4):
        self.bits = int_in_range(bits, "bits", 1, 8)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        levels = 2 ** self.bits - 1
        return straight_through(pixels, lambda x: (x * levels).round() / levels)
