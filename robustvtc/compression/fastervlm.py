"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning", 2024).

Rule (reference code Theia-4869/FasterVLM): score each patch by the CLS->patch attention of the encoder's
feature layer (LLaVA: penultimate), averaged over heads; keep the top-K, in raster order, no merging.
"""
from __future__ import annotations

import torch

from ..models.base import VisualTokens
from .base import KeepPlan, PreLLMCompressor, topk_sorted
from .registry import COMPRESSORS


@COMPRESSORS.register()
class FasterVLM(PreLLMCompressor):
    name = "fastervlm"
    fidelity = "exact rule: top-K head-mean CLS attention, raster order (hand-built test)"
    paper = "FasterVLM, arXiv 2412.01818"
    native_knob = "visual_token_num = budget"
    requires = ("cls_token",)
    relaxable = True

    def __init__(self, layer: int | None = None, relaxation: str = "none", temperature: float = 0.1):
        self.layer = layer  # None = the feature layer, as in the reference code
        self._set_relaxation(relaxation, temperature)

    def signal_layers(self) -> tuple[int, ...]:
        return () if self.layer is None else (self.layer,)

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        scores = tokens.cls_attention(self.layer, reduce="mean")
        index = topk_sorted(scores, budget)
        return KeepPlan.from_indices(index, tokens.num_tokens).scale_rows(self.gains(scores, index, budget))
