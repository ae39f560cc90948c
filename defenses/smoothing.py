"""Randomised smoothing of the answer (Cohen et al., ICML 2019, prediction rule without certification): the
answer scores are the average, over ``samples`` Gaussian-noise copies of the image, of each candidate's
probability, i.e. log mean_s p_s. Randomised, differentiable: an adaptive attacker adds EOT on top.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .base import DEFENSES, OutputDefense, float_in_range, int_in_range


@DEFENSES.register()
class Smoothing(OutputDefense):
    """Args: sigma: noise std in [0, 1] pixel units; samples: noisy copies per prediction; seed."""

    name = "smoothing"
    paper = "Cohen et al., Certified Adversarial Robustness via Randomized Smoothing, ICML 2019"
    randomized = True

    def __init__(self, sigma: float = 0.05, samples: int = 4, seed: int = 0):
        self.sigma = float_in_range(sigma, "sigma", 0.0, low_open=True)
        self.samples = int_in_range(samples, "samples", 1)
        self._seed(seed)

    def aggregate(self, loglik: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        draws = [loglik((pixels + self.sigma * self._randn(pixels)).clamp(0, 1)) for _ in range(self.samples)]
        return torch.stack(draws).logsumexp(dim=0) - math.log(self.samples)
