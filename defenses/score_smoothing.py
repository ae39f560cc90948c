"""Spatial smoothing of the importance map before top-K: a box filter over the token grid, so one token's
attention cannot be raised alone -- an attacker must lift a whole neighbourhood, which real objects do and
isolated adversarial peaks do not. Deterministic, differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens

from .base import DEFENSES, ScoreDefense, int_in_range


@DEFENSES.register()
class ScoreSmoothing(ScoreDefense):
    """Args: kernel: odd side of the box filter in tokens (borders average over the tokens inside the grid)."""

    name = "score_smoothing"
    paper = "spatial smoothing (Xu et al., Feature Squeezing, NDSS 2018) applied to token importance"

    def __init__(self, kernel: int = 3):
        self.kernel = int_in_range(kernel, "kernel", 1)
        if self.kernel % 2 == 0:
            raise UserInputError(f"kernel must be odd, got {kernel!r}")

    def transform(self, scores: torch.Tensor, tokens: VisualTokens, layer: int | None, reduce: str) -> torch.Tensor:
        gh, gw = tokens.grid
        if scores.shape[-1] != gh * gw:
            raise UserInputError(f"defense {self.name!r} smooths one crop's {gh}x{gw} grid, got {scores.shape[-1]} "
                                 "scores")
        x = scores.reshape(-1, 1, gh, gw)
        x = F.avg_pool2d(x, self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False)
        return x.reshape(scores.shape)
