"""Known-budget encoder attack: damage only the tokens that are in the top-K right now.

The ablation between the full-token baseline and CAGE (CAGE's paper restricts VEAttack to the top
K_attack tokens and finds the attack strongest when K_attack equals the deployed budget). It knows the
budget K and assumes the compressor ranks tokens by CLS attention, as CAGE does, but neither reads the
deployed compressor nor pushes the ranking.
"""
from __future__ import annotations

import torch

from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens

from .base import (ATTACKS, IMPORTANCE_SCORES, SCORE_REQUIRES, EncoderAttack, ThreatModel, check_choice,
                   descending_rank, importance)


@ATTACKS.register()
class KnownBudget(EncoderAttack):
    """Mean 1 - cos distortion over the current top-``budget`` tokens (ranks recomputed every step, detached).

    Args:
        budget: K. None = the budget of the target the attack was given (an error for an uncompressed one).
        layer, score: the importance ranking, as in :class:`~robustvtc.attacks.cage.CAGE`.
    """

    name = "known_budget"
    role = "compression_aligned"
    paper = "top-K_attack ablation of CAGE (arXiv 2601.21531)"
    threat = ThreatModel(gradients="encoder", compressor_known=False, budget_known=True, uses_question=False)

    def __init__(self, model, *, budget: int | None = None, layer: int | None = None, score: str = "attention",
                 **common):
        super().__init__(model, **common)
        n = self.adapter.num_visual_tokens
        if budget is None:
            if self.target.budget == n:
                raise UserInputError("known_budget needs budget=K or a compressed target to take K from")
            budget = self.target.budget
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
            raise UserInputError(f"budget must be an integer in 1..{n} (the model's token count), got {budget!r}")
        self.budget = budget
        self.layer = layer
        self.score = check_choice(score, IMPORTANCE_SCORES, "importance score")
        self._require(SCORE_REQUIRES[self.score], f" with score={self.score!r}")

    def signal_layers(self) -> tuple[int, ...]:
        return () if self.layer is None else (self.layer,)

    def reduce(self, tokens: VisualTokens, distortion: torch.Tensor) -> torch.Tensor:
        kept = descending_rank(importance(tokens, self.score, self.layer)) < self.budget
        return (distortion * kept).sum(dim=-1) / self.budget
