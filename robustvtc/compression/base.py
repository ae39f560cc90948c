"""Compressor interface: a published token-compression rule that turns N visual tokens into K.

Pre-LLM compressors return a :class:`KeepPlan` (which sources each kept token is made of, with merge
weights); the plan is applied to the features so kept values stay differentiable w.r.t. pixels while the
selection itself is discrete. In-LLM compressors choose which visual tokens survive at one decoder layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UserInputError
from ..models.base import InLLMContext, VisualTokens


@dataclass
class KeepPlan:
    """Kept token k = sum_j weights[b, k, j] * source_j, sources = N patches then CLS (index N).

    ``space`` says whether sources are vision features ("vision": merged before the projector) or
    projected embeddings ("projected": merged after it). Pure selection is one-hot rows.
    """

    weights: torch.Tensor  # (B, K, N + 1)
    space: str = "vision"

    @classmethod
    def from_indices(cls, indices: torch.Tensor, num_patches: int, space: str = "vision") -> "KeepPlan":
        """One-hot plan selecting source ``indices`` (B, K) (index N = CLS)."""
        w = torch.zeros(*indices.shape, num_patches + 1, device=indices.device)
        w.scatter_(-1, indices.unsqueeze(-1), 1.0)
        return cls(w, space)

    @property
    def budget(self) -> int:
        return self.weights.shape[1]

    @property
    def num_patches(self) -> int:
        return self.weights.shape[2] - 1

    def primary_sources(self) -> torch.Tensor:
        """(B, K) the source with the largest weight in each kept token."""
        return self.weights.argmax(dim=-1)

    def kept_patch_mask(self) -> torch.Tensor:
        """(B, N) bool: patches that contribute to any kept token (for kept-token maps and overlap metrics)."""
        return (self.weights[..., : self.num_patches] > 0).any(dim=1)

    def apply(self, sources: torch.Tensor) -> torch.Tensor:
        """(B, N + 1, D) sources -> (B, K, D) kept tokens."""
        return torch.einsum("bkn,bnd->bkd", self.weights.to(sources.dtype), sources)


class Compressor:
    """Base class; subclasses declare their metadata as class attributes (garak-style) and are registered."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    stage: ClassVar[str] = "pre_llm"  # or "in_llm"
    text_aware: ClassVar[bool] = False
    randomized: ClassVar[bool] = False
    native_knob: ClassVar[str] = "budget"  # the method's own control and how the budget maps to it

    def signal_layers(self) -> tuple[int, ...]:
        """Encoder layers whose queries/keys the method needs besides the feature layer."""
        return ()

    def check_budget(self, budget: int, num_tokens: int) -> int:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise UserInputError(f"budget must be an integer, got {budget!r}")
        if not 1 <= budget <= num_tokens:
            raise UserInputError(f"budget {budget} out of range; accepted: 1..{num_tokens} (the model's visual token count)")
        return budget

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class PreLLMCompressor(Compressor):
    stage = "pre_llm"

    def plan(self, tokens: VisualTokens, budget: int) -> KeepPlan:
        raise NotImplementedError

    def compress(self, tokens: VisualTokens, budget: int, project) -> tuple[torch.Tensor, KeepPlan]:
        """Kept LLM-input embeddings (B, K, D_llm) and the plan; ``project`` is the adapter's projector."""
        budget = self.check_budget(budget, tokens.num_tokens)
        plan = self.plan(tokens, budget)
        sources = torch.cat([tokens.features, tokens.cls.unsqueeze(1)], dim=1)
        if plan.space == "vision":
            return project(plan.apply(sources)), plan
        return plan.apply(project(sources)), plan


class InLLMHook:
    """A bound in-LLM compressor: at decoder layer ``layer`` keep ``budget`` visual tokens."""

    def __init__(self, compressor: "InLLMCompressor", budget: int):
        self.compressor, self.budget = compressor, budget
        self.layer = compressor.layer
        self.position_policy = compressor.position_policy
        self.last_keep: torch.Tensor | None = None

    def select(self, ctx: InLLMContext) -> torch.Tensor:
        keep = self.compressor.select(ctx, self.budget)
        self.last_keep = keep.detach()
        return keep


class InLLMCompressor(Compressor):
    stage = "in_llm"
    layer: int = 2
    position_policy: str = "original"  # keep the kept tokens' RoPE positions ("original") or renumber ("contiguous")

    def select(self, ctx: InLLMContext, budget: int) -> torch.Tensor:
        """(B, budget) indices into ``ctx.visual_index`` of the visual tokens to keep."""
        raise NotImplementedError

    def bind(self, budget: int, num_tokens: int) -> InLLMHook:
        return InLLMHook(self, self.check_budget(budget, num_tokens))


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, returned in ascending (raster) order; ties -> lower index."""
    return scores.detach().float().topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
