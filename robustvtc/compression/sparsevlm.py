"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025).

Rule (reference code Gumpest/SparseVLMs v1.5, ``modelling_sparse_llama.py`` and ``score.py``):

* text raters, once, from the LLM input embeddings: R = softmax over text of V T^T (V visual, T the text
  after the image), averaged over visual tokens; raters = text tokens whose relevance exceeds the mean;
* at a sparsification layer l: that layer's softmax attention, mean over heads, rows = raters, columns =
  visual tokens, averaged over raters; top-k kept, tokens dropped from layer l's *output* on, positions
  renumbered contiguously (v1.x).

Mapping to our budget: one sparsification layer whose kept count is the budget. The paper's "192 / 128 /
64" are FLOP-equivalent averages of a 3-stage schedule after layers 2, 6, 15 (192 -> 300 / 200 / 110, 128
-> 303 / 110 / 36, 64 -> 66 / 30 / 17), not the count reaching the LLM. Our ``layer`` counts like every
in-LLM method here: tokens are dropped before decoder layer ``layer``, scored with layer ``layer - 1``'s
attention, so the paper's first stage (layer 2) is ``layer=3``. Not reproduced: the later stages and
v1.x token recycling (DPC-kNN clusters of 30 % of the dropped tokens, randomised by tie-break noise), and
v2.0's head selection / RoPE correction.
"""
from __future__ import annotations

import torch

from ..models.base import InLLMContext
from .base import InLLMCompressor
from .registry import COMPRESSORS


def text_raters(ctx: InLLMContext) -> torch.Tensor:
    """(B, T) bool: SparseVLM's raters among the (valid) text tokens after the image."""
    emb = ctx.input_embeds.float()
    d = emb.shape[-1]
    v = emb.gather(1, ctx.visual_index.unsqueeze(-1).expand(-1, -1, d))
    t = emb.gather(1, ctx.text_index.unsqueeze(-1).expand(-1, -1, d))
    logits = (v @ t.transpose(1, 2)).masked_fill(~ctx.text_valid.unsqueeze(1), float("-inf"))
    relevance = logits.softmax(dim=-1).mean(dim=1)  # (B, T), 0 at padding
    valid = ctx.text_valid.float()
    mean = (relevance * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
    raters = (relevance > mean) & ctx.text_valid
    # all relevances equal -> no rater above the mean: fall back to every text token
    return torch.where(raters.any(-1, keepdim=True), raters, ctx.text_valid)


@COMPRESSORS.register()
class SparseVLM(InLLMCompressor):
    name = "sparsevlm"
    fidelity = "one stage only (v1.5 raters and score); no later stages, recycling or v2.0 heads"
    paper = "SparseVLM, ICML 2025, arXiv 2410.04417"
    text_aware = True
    position_policy = "contiguous"
    native_knob = "one sparsification layer keeping the budget (paper: per-layer table, see docstring)"
    relaxable = True

    def __init__(self, layer: int = 3, relaxation: str = "none", temperature: float = 0.1):
        self.layer = layer
        self._set_relaxation(relaxation, temperature)

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        return {**super().budget_mapping(budget, num_tokens, num_layers), "paper_layer": self.layer - 1}

    def scores(self, ctx: InLLMContext) -> torch.Tensor:
        if ctx.hidden.shape[1] != ctx.input_embeds.shape[1]:
            raise RuntimeError("sparsevlm scores at the first pruning point (input layout expected)")
        raters = text_raters(ctx).float()
        rows = ctx.attention_rows(ctx.text_index).gather(
            2, ctx.visual_index.unsqueeze(1).expand(-1, raters.shape[1], -1))  # (B, T, K)
        return (rows * raters.unsqueeze(-1)).sum(1) / raters.sum(-1, keepdim=True)
