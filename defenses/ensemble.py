"""Ensemble selection: the deployed compressor and other compressors each choose K tokens, and the K tokens
with the most votes are kept (ties go to the deployed compressor's choice). An attack that moves one
scoring rule (CLS attention) must now also move rules that score differently (feature diversity, ...).
The result is a pure selection -- merging compressors contribute the tokens their kept tokens stand for.
Deterministic when every member is; gradients flow through the kept tokens' values.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from robustvtc.compression import check_compatible, get_compressor
from robustvtc.compression.base import KeepPlan, PreLLMCompressor, topk_sorted
from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens

from .base import DEFENSES, SelectionDefense
from .pipeline import plan_of

if TYPE_CHECKING:
    from robustvtc.target import Target


def primary_votes(plan: KeepPlan) -> torch.Tensor:
    """(B, N) 1 where a patch is the main source of a kept token (CLS and empty rows vote for nothing)."""
    n = plan.num_patches
    source = plan.primary_sources().masked_fill(plan.weights.abs().sum(-1) == 0, n)
    votes = torch.zeros(plan.weights.shape[0], n + 1, device=source.device).scatter(1, source, 1.0)
    return votes[:, :n]


@DEFENSES.register()
class Ensemble(SelectionDefense):
    """Args: members: names of pre-LLM compressors voting beside the deployed one (the deployed one is not
    repeated)."""

    name = "ensemble"
    paper = "majority vote over token compressors"

    def __init__(self, members: Sequence[str] = ("fastervlm", "divprune")):
        if isinstance(members, str) or not members:
            raise UserInputError(f"members must be a non-empty list of compressor names, got {members!r}")
        self.members = tuple(members)
        self._compressors = [get_compressor(m) for m in self.members]
        for comp in self._compressors:
            if not isinstance(comp, PreLLMCompressor) or comp.name == "none":
                raise UserInputError(f"ensemble members must be pre-LLM compressors that select; got {comp.name!r}")
        self.randomized = any(c.randomized for c in self._compressors)

    def check(self, target: "Target") -> None:
        super().check(target)
        for comp in self._compressors:
            check_compatible(target.adapter, comp, target.budget)

    def plan(self, compressor: PreLLMCompressor, tokens: VisualTokens, budget: int,
             project: Callable[[torch.Tensor], torch.Tensor]) -> KeepPlan:
        voters = [compressor, *(c for c in self._compressors if c.name != compressor.name)]
        votes = [primary_votes(plan_of(c, tokens, budget, project)) for c in voters]
        ranking = torch.stack(votes).sum(dim=0) + 0.5 * votes[0]
        return KeepPlan.from_indices(topk_sorted(ranking, budget), tokens.num_tokens, space=compressor.space)
