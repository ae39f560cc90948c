"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

Rule: before decoder layer K (default 2) keep the visual tokens with the highest head-averaged attention of
layer K - 1; the rest are dropped (no merge), kept tokens keep their original RoPE positions (in-place
mode). The score differs between code and paper:

* ``rule="last_token"`` (default, reference code pkunlp-icler/FastV): the attention row of the last prompt
  token. Scoring once with the prompt's last token is the reference KV-cache port's behaviour; the
  original re-pruned at every generated token;
* ``rule="received"`` (the paper): the mean attention each visual token receives from all (real) tokens.
"""
from __future__ import annotations

import torch

from ..errors import UserInputError
from ..models.base import InLLMContext
from .base import InLLMCompressor
from .registry import COMPRESSORS

RULES = ("last_token", "received")


def received_attention(ctx: InLLMContext) -> torch.Tensor:
    """(B, L) mean attention each position receives from every real query position (previous layer)."""
    B, L = ctx.attention_mask.shape
    rows = ctx.attention_rows(torch.arange(L, device=ctx.hidden.device).expand(B, L))  # (B, L, L)
    real = ctx.attention_mask.to(rows.dtype).unsqueeze(-1)
    return (rows * real).sum(1) / real.sum(1)


@COMPRESSORS.register()
class FastV(InLLMCompressor):
    name = "fastv"
    fidelity = "exact last-token rule vs eager attention on the model; rule='received' = the paper"
    paper = "FastV, ECCV 2024, arXiv 2403.06764"
    text_aware = True
    native_knob = "filtering ratio R = 1 - budget / N at layer K"
    relaxable = True

    def __init__(self, layer: int = 2, rule: str = "last_token", relaxation: str = "none", temperature: float = 0.1):
        if rule not in RULES:
            raise UserInputError(f"unknown rule {rule!r}; accepted: {', '.join(RULES)}")
        self.layer, self.rule = layer, rule
        self._set_relaxation(relaxation, temperature)

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        return {**super().budget_mapping(budget, num_tokens, num_layers), "K": self.layer,
                "R": 1 - budget / num_tokens}

    def scores(self, ctx: InLLMContext) -> torch.Tensor:
        if self.rule == "last_token":
            row = ctx.attention_rows(ctx.text_index[:, -1:])[:, 0]
        else:
            row = received_attention(ctx)
        return row.gather(1, ctx.visual_index)
