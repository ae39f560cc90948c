"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", CVPR 2025).

Rule (reference code Cooperx521/PyramidDrop, ``pdrop_rank_drop``): at the input of each stage layer
(8, 16, 24 for a 32-layer LLM) the hidden states go through *that* layer's input norm and q/k projections
(with RoPE); the attention row of the last instruction token, averaged over heads, ranks the visual tokens;
the top lambda^s fraction of the original count is kept (raster order) and positions are renumbered
contiguously.

Budget: the count after the last stage; earlier stages keep budget / lambda^(S - s) (clipped to N), which
for lambda = 0.5, N = 576 and budget 72 is the paper's 288 / 144 / 72. Without explicit ``layers`` the
stages sit at 1/4, 1/2, 3/4 of the LLM depth (the paper's 8/16/24 of 32); duplicates merge on shallow LLMs
(3 layers: 1 and 2).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserInputError
from ..models.base import InLLMContext
from .base import InLLMCompressor
from .registry import COMPRESSORS

PAPER_DEPTH = 32


@COMPRESSORS.register()
class PDrop(InLLMCompressor):
    name = "pdrop"
    fidelity = "exact score (layer about to run) and stage schedule (hand-built and on the model)"
    paper = "PyramidDrop, CVPR 2025, arXiv 2410.17247"
    text_aware = True
    position_policy = "contiguous"
    native_knob = "lambda schedule ending at the budget: stage s keeps budget / lambda^(S - s)"
    relaxable = True

    def __init__(self, layers: tuple[int, ...] | None = None, lam: float = 0.5, relaxation: str = "none",
                 temperature: float = 0.1):
        if not 0 < lam <= 1:
            raise UserInputError(f"lam must lie in (0, 1], got {lam!r}")
        if layers is not None and (not layers or sorted(set(layers)) != list(layers)):
            raise UserInputError(f"layers must be strictly increasing, got {layers!r}")
        self.layers, self.lam = (tuple(layers) if layers is not None else None), lam
        self._set_relaxation(relaxation, temperature)

    def stage_layers(self, num_layers: int | None) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        depth = num_layers or PAPER_DEPTH
        return tuple(sorted({max(1, math.floor(depth * f + 0.5)) for f in (0.25, 0.5, 0.75)}))

    def schedule(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict[int, int]:
        layers = self.stage_layers(num_layers)
        last = len(layers) - 1
        return {layer: min(num_tokens, math.floor(budget / self.lam ** (last - s) + 0.5))
                for s, layer in enumerate(layers)}

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        return {**super().budget_mapping(budget, num_tokens, num_layers), "lambda": self.lam}

    def scores(self, ctx: InLLMContext) -> torch.Tensor:
        return ctx.current_attention_rows(ctx.text_index[:, -1:])[:, 0].gather(1, ctx.visual_index)
