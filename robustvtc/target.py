"""A target is what is under test: an LVLM adapter + a compressor + a budget.

It exposes the whole pipeline as differentiable functions of the pixels, so attacks, defenses and the
campaign runner share one code path whatever the model family or compressor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .compression import Compressor, KeepPlan, get_compressor
from .compression.base import EncoderCompressor, InLLMCompressor
from .errors import UserInputError
from .models.base import VisualEmbeds, VisualTokens


@dataclass
class Forward:
    """One pass of a target: the visual tokens, what the compressor kept, and the LLM-input embeddings."""

    tokens: VisualTokens
    embeds: torch.Tensor | list | VisualEmbeds  # (B, K, D_llm) after any pre-LLM compression, in the adapter's layout
    plan: KeepPlan | None  # None for in-LLM compressors (they decide inside the decoder)
    in_llm: object | None = None


class Target:
    def __init__(self, adapter, compressor: str | Compressor = "none", budget: int | None = None, **compressor_kwargs):
        self.adapter = adapter
        self.compressor = get_compressor(compressor, **compressor_kwargs) if isinstance(compressor, str) else compressor
        n = adapter.num_visual_tokens
        self.budget = n if budget is None else self.compressor.check_budget(budget, n)
        if self.compressor.name == "none" and self.budget != n:
            raise UserInputError(f"compressor 'none' keeps all {n} tokens; got budget {budget}")
        adapter.check_target(self.compressor, self.budget)

    def __repr__(self) -> str:
        return f"Target({self.adapter.name}, {self.compressor.name}, budget={self.budget})"

    @property
    def signal_layers(self) -> tuple[int, ...]:
        return self.compressor.signal_layers()

    def encode(self, pixels: torch.Tensor) -> VisualTokens:
        return self.adapter.encode(pixels, self.signal_layers)

    def forward(self, pixels: torch.Tensor | None = None, tokens: VisualTokens | None = None) -> Forward:
        """Encode (or reuse ``tokens``) and apply the compressor; the LLM part runs in the scoring methods."""
        if tokens is None:
            tokens = self.encode(pixels)
        if isinstance(self.compressor, InLLMCompressor):
            hook = self.compressor.bind(self.budget, tokens.num_tokens, getattr(self.adapter, "num_llm_layers", None))
            return Forward(tokens, self.adapter.project(tokens.features), None, hook)
        if isinstance(self.compressor, EncoderCompressor) and pixels is None:  # merges inside the encoder
            raise UserInputError(f"{self.compressor.name} merges inside the vision encoder; pass the pixels")
        embeds, plan = self.adapter.compress(self.compressor, tokens, self.budget, pixels)  # the layout is the model's
        return Forward(tokens, embeds, plan)

    def budget_mapping(self) -> dict:
        """How this target's budget maps onto the compressor's own knobs (recorded with results)."""
        depth = {"in_llm": getattr(self.adapter, "num_llm_layers", None),
                 "in_encoder": getattr(self.adapter, "feature_layer", -1) + 1}.get(self.compressor.stage)
        return self.compressor.budget_mapping(self.budget, self.adapter.num_visual_tokens, depth)

    def candidate_logprobs(self, pixels, questions: Sequence[str], candidates: Sequence[str],
                           tokens: VisualTokens | None = None) -> torch.Tensor:
        fwd = self.forward(pixels, tokens)
        return self.adapter.candidate_logprobs(fwd.embeds, questions, candidates, in_llm=fwd.in_llm)

    def answer_loss(self, pixels, questions: Sequence[str], answers: Sequence[str],
                    tokens: VisualTokens | None = None) -> torch.Tensor:
        fwd = self.forward(pixels, tokens)
        return self.adapter.answer_loss(fwd.embeds, questions, answers, in_llm=fwd.in_llm)

    @torch.no_grad()
    def predict(self, pixels, questions: Sequence[str], candidates: Sequence[str],
                tokens: VisualTokens | None = None) -> list[str]:
        """The candidate with the highest log-probability, per sample."""
        scores = self.candidate_logprobs(pixels, questions, candidates, tokens)
        return [candidates[i] for i in scores.argmax(-1).tolist()]
