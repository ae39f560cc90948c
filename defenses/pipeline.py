"""How score and selection defenses reach every pre-LLM compressor without touching the compressors.

* Score defenses: :class:`ScoredTokens` are visual tokens whose ``cls_attention`` passes through the
  defenses' transforms, so every compressor (and every attack) that ranks by CLS attention reads the
  defended importance.
* Selection defenses: :class:`DefendedCompressor` wraps the deployed compressor; adapters call it like any
  pre-LLM compressor (per crop for LLaVA-NeXT), and it lets the selection defense choose the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import torch

from robustvtc.compression.base import KeepPlan, PreLLMCompressor
from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens

from .base import ScoreTransform, SelectionDefense


@dataclass
class ScoredTokens(VisualTokens):
    """Visual tokens whose CLS attention passes through score defenses (in order); ``read`` says whether a
    compressor asked for it, so a compressor that bypasses ``cls_attention`` is caught, not silently undefended."""

    transforms: tuple[ScoreTransform, ...] = ()
    read: bool = field(default=False, repr=False)

    @classmethod
    def wrap(cls, tokens: VisualTokens, transforms: Sequence[ScoreTransform]) -> "ScoredTokens":
        return cls(**{f.name: getattr(tokens, f.name) for f in fields(VisualTokens)}, transforms=tuple(transforms))

    def cls_attention(self, layer: int | None = None, reduce: str = "mean") -> torch.Tensor:
        scores = super().cls_attention(layer, reduce)
        self.read = True
        for transform in self.transforms:
            scores = transform(scores, self, layer, reduce)
        return scores

    def crop(self, c: int) -> "ScoredTokens":
        return self.wrap(super().crop(c), self.transforms)


def plan_of(compressor: PreLLMCompressor, tokens: VisualTokens, budget: int,
            project: Callable[[torch.Tensor], torch.Tensor]) -> KeepPlan:
    """``compressor``'s own plan, with the projected sources it needs if it plans on LLM-input embeddings."""
    projected = project(tokens.sources()) if compressor.space == "projected" else None
    return compressor.plan(tokens, compressor.check_budget(budget, tokens.num_tokens), projected=projected)


class _FixedPlan(PreLLMCompressor):
    """Applies an already chosen plan through the base class (vision or projected space, adaptive lengths)."""

    name = "fixed_plan"

    def __init__(self, plan: KeepPlan):
        self._plan, self.space = plan, plan.space

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        return self._plan


class DefendedCompressor(PreLLMCompressor):
    """The deployed pre-LLM compressor with a selection defense around it and a check that score defenses act."""

    def __init__(self, inner: PreLLMCompressor, selection: SelectionDefense | None):
        self.inner, self.selection = inner, selection
        self.name, self.space = inner.name, inner.space

    def compress(self, tokens: VisualTokens, budget: int, project: Callable[[torch.Tensor], torch.Tensor]):
        budget = self.inner.check_budget(budget, tokens.num_tokens)
        if self.selection is None:
            plan = plan_of(self.inner, tokens, budget, project)
        else:
            plan = self.selection.plan(self.inner, tokens, budget, project)
        if isinstance(tokens, ScoredTokens) and tokens.transforms and not tokens.read:
            raise UserInputError(f"compressor {self.inner.name!r} did not read the CLS attention through "
                                 "VisualTokens.cls_attention, so the score defenses would have no effect")
        return _FixedPlan(plan).compress(tokens, budget, project)
