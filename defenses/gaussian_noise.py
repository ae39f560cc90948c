"""Gaussian input noise: one fresh draw per forward pass, the building block of randomised smoothing
(Cohen et al., ICML 2019; the averaged form is the ``smoothing`` output defense). Differentiable, randomised:
an adaptive attacker averages gradients over draws (EOT).
"""
from __future__ import annotations

import torch

from .base import DEFENSES, InputDefense, float_in_range


@DEFENSES.register()
class GaussianNoise(InputDefense):
    """Args: sigma: standard deviation in [0, 1] pixel units; seed: of the defense's own generator."""

    name = "gaussian_noise"
    paper = "Cohen et al., Certified Adversarial Robustness via Randomized Smoothing, ICML 2019"
    randomized = True

    def __init__(self, sigma: float = 0.05, seed: int = 0):
        self.sigma = float_in_range(sigma, "sigma", 0.0, low_open=True)
        self._seed(seed)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels + self.sigma * self._randn(pixels)).clamp(0, 1)
