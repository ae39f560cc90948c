"""Gaussian noise on the importance scores before top-K: near-ties at the budget boundary -- which a
rank-pushing attack (CAGE's rank distortion) creates and exploits -- are decided by chance, not by the
attacker. The noise is relative to each image's score spread, so it is scale-free. Randomised, differentiable.
"""
from __future__ import annotations

import torch

from robustvtc.models.base import VisualTokens

from .base import DEFENSES, ScoreDefense, float_in_range


@DEFENSES.register()
class ScoreNoise(ScoreDefense):
    """Args: sigma: noise std as a fraction of the per-image standard deviation of the scores; seed."""

    name = "score_noise"
    paper = "randomised selection, cf. Xie et al. 2018 (randomisation) applied to token importance"
    randomized = True

    def __init__(self, sigma: float = 0.1, seed: int = 0):
        self.sigma = float_in_range(sigma, "sigma", 0.0, low_open=True)
        self._seed(seed)

    def transform(self, scores: torch.Tensor, tokens: VisualTokens, layer: int | None, reduce: str) -> torch.Tensor:
        spread = scores.detach().std(dim=-1, keepdim=True)
        return scores + self.sigma * spread * self._randn(scores)
