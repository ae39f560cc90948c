"""LLaVA-PruMerge and PruMerge+ (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient
Large Multimodal Models", ICCV 2025).

Rule (reference code 42Shawn/LLaVA-PruMerge, ``clip_encoder.token_prune_merge_advanced[_plus]``):

* CLS attention of the **last** encoder layer recomputed from its hooked q/k as a single head over the
  concatenated heads, ``softmax(q_cls K^T / sqrt(D))`` (not the per-head attention others use);
* centres: the top-n patches by that attention (descending order, as the reference leaves them). The
  paper's n is adaptive: the number of IQR outliers (> Q3 + 1.5 IQR) of the attention (``adaptive=True``;
  the reference computes quartiles over the whole batch, we do it per image). With a budget K (default)
  n = K - 1, so that the centres plus the extra token below are exactly K tokens;
* merge: each centre absorbs its ``neighbours`` (32) most key-similar other patches (cosine of the
  concatenated last-layer keys) weighted by their raw CLS attention, ``x_i + sum_j a_j x_j`` (not
  normalised: plan rows do not sum to 1); one extra token ``sum_{j not a centre} a_j x_j`` is appended.

PruMerge+ adds spatially uniform centres. Reference (adaptive): indices 0, s, 2s, ... < N - 1 with
s = int(int(N / n) / 3), minus those already chosen (about 3n extra). With a budget: round((K - 1) / 4)
attention centres (the reference's 1 : 3 proportion) and the other K - 1 - that uniformly strided over the
remaining patches in raster order, so the count is exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..models.base import VisualTokens
from .base import KeepPlan, PreLLMCompressor, remaining_indices
from .registry import COMPRESSORS


def single_head_cls_attention(tokens: VisualTokens, layer: int = -1) -> torch.Tensor:
    """(B, N) CLS->patch attention of ``layer`` as one head over the concatenated heads (PruMerge's rule)."""
    sig = tokens.layer_signals(layer)
    B, H, T, d = sig.keys.shape
    q = sig.queries[:, :, 0].reshape(B, H * d)
    k = sig.keys.transpose(1, 2).reshape(B, T, H * d)
    return (torch.einsum("bd,btd->bt", q, k) / math.sqrt(H * d)).softmax(dim=-1)[:, 1:]


def iqr_outlier_count(attention: torch.Tensor) -> torch.Tensor:
    """(B,) number of values above Q3 + 1.5 IQR per row (linear-interpolated quartiles, as numpy's percentile)."""
    a = attention.detach().double()
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], dtype=a.dtype, device=a.device), dim=-1)
    return (a > (q3 + 1.5 * (q3 - q1)).unsqueeze(-1)).sum(dim=-1)


@COMPRESSORS.register()
class PruMerge(PreLLMCompressor):
    name = "prumerge"
    fidelity = "rule exact; budgeted n = K - 1 centres (adaptive=True: paper's IQR count, per image)"
    paper = "LLaVA-PruMerge, ICCV 2025, arXiv 2403.15388"
    native_knob = "IQR-adaptive count replaced by the budget: budget - 1 merged centres + 1 extra token"
    requires = ("cls_token",)
    relaxable = True
    normalized_plan = False

    def __init__(self, adaptive: bool = False, neighbours: int = 32, relaxation: str = "none",
                 temperature: float = 0.1):
        if neighbours < 0:
            raise UserInputError(f"neighbours must be >= 0, got {neighbours!r}")
        if adaptive and relaxation != "none":
            raise UserInputError("relaxation needs a fixed budget; use adaptive=False")
        self.adaptive, self.neighbours = adaptive, neighbours
        self._set_relaxation(relaxation, temperature)

    def signal_layers(self) -> tuple[int, ...]:
        return (-1,)

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        if self.adaptive:
            return {"budget": "adaptive", "rule": "IQR outliers of the CLS attention as centres + 1 extra token"}
        return {"budget": budget, "centres": budget - 1, "extra_token": 1}

    def centres(self, attention: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Centre indices (B, C), their validity (B, C) and how many leading columns are attention-ranked."""
        if not self.adaptive:
            return attention.detach().topk(budget - 1, dim=-1).indices, torch.ones(
                attention.shape[0], budget - 1, dtype=torch.bool, device=attention.device), budget - 1
        n = iqr_outlier_count(attention).clamp(min=1)
        idx = attention.detach().topk(int(n.max()), dim=-1).indices
        return idx, torch.arange(idx.shape[1], device=idx.device) < n.unsqueeze(-1), idx.shape[1]

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        attn = single_head_cls_attention(tokens)
        idx, valid, ranked = self.centres(attn, budget)
        B, N = attn.shape
        C = idx.shape[1]
        sig = tokens.layer_signals(-1)
        keys = F.normalize(sig.keys[:, :, 1:].transpose(1, 2).reshape(B, N, -1).detach().float(), dim=-1)
        sim = keys.gather(1, idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1])) @ keys.transpose(1, 2)
        sim = sim.scatter(2, idx.unsqueeze(-1), float("-inf"))  # a centre is not its own neighbour
        nn = sim.topk(min(self.neighbours, N - 1), dim=-1).indices  # (B, C, nb)
        w = torch.zeros(B, C, N + 1, dtype=attn.dtype, device=attn.device)
        w = w.scatter(2, nn, attn.unsqueeze(1).expand(-1, C, -1).gather(2, nn))
        w = w.scatter(2, idx.unsqueeze(-1), 1.0) * valid.unsqueeze(-1)
        is_centre = torch.zeros(B, N + 1, dtype=torch.bool, device=attn.device)
        is_centre = is_centre.scatter(1, idx.masked_fill(~valid, N), True)
        extra = (F.pad(attn, (0, 1)) * ~is_centre).unsqueeze(1)  # (B, 1, N + 1), CLS column stays 0
        if not self.adaptive:
            plan = KeepPlan(torch.cat([w, extra], dim=1))
            return plan.scale_rows(self.gains(attn, idx[:, :ranked], ranked)) if ranked else plan
        lengths = valid.sum(-1)
        w = torch.cat([w, torch.zeros_like(extra)], dim=1)
        row = torch.arange(C + 1, device=attn.device).view(1, -1, 1)
        return KeepPlan(torch.where(row == lengths.view(-1, 1, 1), extra, w), lengths=lengths + 1)


@COMPRESSORS.register()
class PruMergePlus(PruMerge):
    name = "prumerge_plus"
    fidelity = "budgeted 1:3 attention:uniform split (adaptive=True: the reference's sequence)"
    paper = "LLaVA-PruMerge+, ICCV 2025, arXiv 2403.15388"
    native_knob = ("budget - 1 centres = round((budget - 1) / 4) by attention + the rest spatially uniform, "
                   "+ 1 extra token")

    def split(self, budget: int) -> tuple[int, int]:
        ranked = math.floor((budget - 1) / 4 + 0.5)
        return ranked, budget - 1 - ranked

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        if self.adaptive:
            return {"budget": "adaptive", "rule": "IQR outliers + uniform samples at stride int(int(N/n)/3) + 1 extra"}
        ranked, uniform = self.split(budget)
        return {"budget": budget, "centres_by_attention": ranked, "spatial_samples": uniform, "extra_token": 1}

    def centres(self, attention: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        B, N = attention.shape
        if self.adaptive:
            top, valid, _ = super().centres(attention, budget)
            rows = []
            for b in range(B):
                chosen = top[b, valid[b]]
                step = max(1, int(int(N / chosen.numel()) / 3))
                grid = torch.arange(0, N - 1, step, device=attention.device)
                rows.append(torch.cat([chosen, grid[~torch.isin(grid, chosen)]]))
            width = max(r.numel() for r in rows)
            idx = torch.stack([F.pad(r, (0, width - r.numel())) for r in rows])
            lengths = torch.tensor([r.numel() for r in rows], device=attention.device)
            return idx, torch.arange(width, device=idx.device) < lengths.unsqueeze(-1), 0
        ranked, uniform = self.split(budget)
        top = attention.detach().topk(ranked, dim=-1).indices
        parts = [top]
        if uniform:
            rest = remaining_indices(top, N)
            parts.append(rest[:, torch.arange(0, rest.shape[1], max(1, rest.shape[1] // uniform),
                                              device=rest.device)[:uniform]])
        idx = torch.cat(parts, dim=1)
        return idx, torch.ones_like(idx, dtype=torch.bool), ranked
