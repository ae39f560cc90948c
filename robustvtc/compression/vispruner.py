"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs", ICCV 2025; successor of FasterVLM).

Rule (reference code Theia-4869/VisPruner, ``llava_arch.encode_images``):

* important: the top floor(K * r) patches by CLS->patch attention of the feature layer, mean over heads;
* diverse: the other patches in descending attention order; repeatedly split that list into even/odd
  positions (A, B), score each A token by its highest cosine similarity (pre-projector features) to any
  B token, and drop the min(8, R - T_div) highest-scoring (most duplicated) A tokens, until T_div = K -
  floor(K * r) remain. Kept tokens in raster order, no merging.

The reference indexes A with R // 2 entries, which only works for an even remainder; we take all
ceil(R / 2) A tokens and drop at most |A| per round, which is the same rule whenever R is even.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..models.base import VisualTokens
from .base import KeepPlan, PreLLMCompressor
from .registry import COMPRESSORS


@COMPRESSORS.register()
class VisPruner(PreLLMCompressor):
    name = "vispruner"
    fidelity = "exact vs the reference loop (even remainders; odd ones take all A tokens)"
    paper = "VisPruner, ICCV 2025, arXiv 2412.01818v2"
    native_knob = "visual_token_num = budget; important = floor(budget * important_ratio), the rest diverse"
    requires = ("cls_token",)
    relaxable = True

    def __init__(self, important_ratio: float = 0.5, per_round: int = 8, relaxation: str = "none",
                 temperature: float = 0.1):
        if not 0 <= important_ratio <= 1:
            raise UserInputError(f"important_ratio must lie in [0, 1], got {important_ratio!r}")
        if per_round < 1:
            raise UserInputError(f"per_round must be >= 1, got {per_round!r}")
        self.important_ratio, self.per_round = important_ratio, per_round
        self._set_relaxation(relaxation, temperature)

    def split(self, budget: int) -> tuple[int, int]:
        important = int(budget * self.important_ratio)
        return important, budget - important

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        imp, div = self.split(budget)
        return {"budget": budget, "important": imp, "diverse": div, "important_ratio": self.important_ratio}

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        n_imp, n_div = self.split(budget)
        scores = tokens.cls_attention(None, reduce="mean")
        order = scores.detach().float().argsort(dim=-1, descending=True, stable=True)
        important, residual = order[:, :n_imp], order[:, n_imp:]
        residual = self._remove_duplicates(F.normalize(tokens.features.detach().float(), dim=-1), residual, n_div)
        index = torch.cat([important, residual], dim=1).sort(dim=-1).values
        plan = KeepPlan.from_indices(index, tokens.num_tokens)
        gain = self.gains(scores, index, n_imp) if n_imp else None
        if gain is None:
            return plan
        is_imp = torch.zeros_like(scores, dtype=torch.bool).scatter(1, important, True).gather(1, index)
        return plan.scale_rows(torch.where(is_imp, gain, torch.ones_like(gain)))  # diverse picks: not score-ranked

    def _remove_duplicates(self, feats: torch.Tensor, residual: torch.Tensor, target: int) -> torch.Tensor:
        """Iterative bipartite pruning of ``residual`` (B, R) down to ``target`` tokens."""
        if target == 0:
            return residual[:, :0]
        rows = torch.arange(feats.shape[0], device=feats.device).unsqueeze(-1)
        while residual.shape[1] > target:
            a, b = residual[:, ::2], residual[:, 1::2]
            r = min(self.per_round, residual.shape[1] - target, a.shape[1])
            sim = (feats[rows, a] @ feats[rows, b].transpose(1, 2)).max(dim=-1).values  # (B, |A|)
            distinct = sim.argsort(dim=-1, descending=True, stable=True)[:, r:]
            residual = torch.cat([a.gather(1, distinct), b], dim=1)
        return residual
