"""Randomised budget: every image keeps a random number of tokens around the deployed budget, so an
attacker cannot tune the damage to one rank boundary (CAGE's reason to take an expectation over budgets).
The deployed compressor picks the tokens; only its K changes. Randomised: adaptive attacks use EOT.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from robustvtc.compression.base import KeepPlan, PreLLMCompressor
from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens

from .base import DEFENSES, SelectionDefense, float_in_range
from .pipeline import plan_of


@DEFENSES.register()
class RandomBudget(SelectionDefense):
    """Args: low, high: each image keeps K' uniform in [round(low * K), round(high * K)] (clipped to 1..N),
    K the target's budget -- the default keeps K tokens on average; seed."""

    name = "random_budget"
    paper = "randomised budget, cf. CAGE's expectation over K ~ U[K_min, K_max] (arXiv 2601.21531)"
    randomized = True

    def __init__(self, low: float = 0.5, high: float = 1.5, seed: int = 0):
        self.low = float_in_range(low, "low", 0.0, low_open=True)
        self.high = float_in_range(high, "high", self.low)
        self._seed(seed)

    def budget_range(self, budget: int, num_tokens: int) -> tuple[int, int]:
        """The smallest and largest K' an image can get."""
        low = min(num_tokens, max(1, round(self.low * budget)))
        return low, min(num_tokens, max(low, round(self.high * budget)))

    def plan(self, compressor: PreLLMCompressor, tokens: VisualTokens, budget: int,
             project: Callable[[torch.Tensor], torch.Tensor]) -> KeepPlan:
        draws = torch.tensor(self._randint(*self.budget_range(budget, tokens.num_tokens), tokens.batch_size))
        plans = {k: plan_of(compressor, tokens, k, project) for k in sorted(set(draws.tolist()))}
        if any(p.lengths is not None for p in plans.values()):
            raise UserInputError(f"defense {self.name!r} needs a compressor with a fixed budget; "
                                 f"{compressor.name!r} chooses its own count")
        width = max(p.budget for p in plans.values())
        draws = draws.to(tokens.features.device)
        weights = None
        for k, plan in plans.items():
            padded = F.pad(plan.weights, (0, 0, 0, width - k))
            weights = padded if weights is None else torch.where((draws == k).view(-1, 1, 1), padded, weights)
        lengths = None if len(plans) == 1 else draws
        return KeepPlan(weights, next(iter(plans.values())).space, lengths)
