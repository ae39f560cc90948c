"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025).

Rule (reference code vbdi/divprune, ``llava_arch.DivPrune``), on the *projected* visual tokens (LLM input
embeddings): distance = 1 - cosine similarity; greedy max-min (farthest point) selection: the first token
is the one whose nearest-neighbour distance (second-smallest entry of its column) is largest, then
repeatedly the token with the largest minimum distance to those already chosen. Kept tokens sorted to
raster order, no merging. The reference relies on a chosen token's zero self-distance to avoid picking it
again; we exclude chosen tokens explicitly (identical unless duplicates tie at distance 0).
Not score-based (no relaxation): the selection is a sequence of argmaxes over distances.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import VisualTokens
from .base import KeepPlan, PreLLMCompressor
from .registry import COMPRESSORS


def greedy_max_min(points: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of DivPrune's greedy max-min selection over (B, N, D) points, in pick order."""
    p = F.normalize(points.detach().float(), dim=-1)
    dist = 1 - p @ p.transpose(1, 2)  # (B, N, N)
    B, N, _ = dist.shape
    rows = torch.arange(B, device=dist.device)
    nearest = dist.topk(min(2, N), dim=1, largest=False).values[:, -1]  # second-smallest per column
    picks = [nearest.argmax(dim=-1)]
    chosen = torch.zeros(B, N, dtype=torch.bool, device=dist.device)
    chosen[rows, picks[0]] = True
    min_dist = dist[rows, picks[0]]
    for _ in range(1, k):
        nxt = min_dist.masked_fill(chosen, float("-inf")).argmax(dim=-1)
        picks.append(nxt)
        chosen[rows, nxt] = True
        min_dist = torch.minimum(min_dist, dist[rows, nxt])
    return torch.stack(picks, dim=1)


@COMPRESSORS.register()
class DivPrune(PreLLMCompressor):
    name = "divprune"
    fidelity = "exact greedy max-min (hand-built); chosen tokens excluded explicitly"
    paper = "DivPrune, CVPR 2025, arXiv 2503.02175"
    native_knob = "SUBSET_RATIO = budget / N"
    space = "projected"

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        return {"budget": budget, "subset_ratio": budget / num_tokens}

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        if projected is None:
            raise TypeError("divprune plans on projected tokens: call compress(), or pass projected=")
        index = greedy_max_min(projected[:, : tokens.num_tokens], budget).sort(dim=-1).values
        return KeepPlan.from_indices(index, tokens.num_tokens, space="projected")
