"""HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
Vision-Language Models", arXiv 2508.00553).

Rule (reference code Danielement321/HiPrune @ 6e83a12, ``LLaVA/llava/model/llava_arch.py``,
``encode_images``), on LLaVA's feature layer, no merging:

* score of a patch in a layer = the attention it *receives*, averaged over heads and over all 1 + N
  queries (CLS included), CLS column dropped ("global attention"; the CLS-row variant is commented out in
  the reference);
* anchors: the top round(K * alpha / 5) patches by the score of the object layer (README default
  ``HIPRUNE_OBJECT_LAYER=9``, 1-based, i.e. encoder layer index 8; ``round`` is Python's, half to even);
* buffers: each anchor's raster neighbours i - 1, i + 1, i - W, i + W, clamped to [0, N - 1] and
  de-duplicated together with the anchors. As in the reference there is no row-boundary check (i - 1 of a
  row's first patch is the previous row's last one) and out-of-range neighbours clamp to patch 0 or N - 1;
* registers: the score of the feature layer, minus 1 on anchors and buffers, top (K - |anchors and
  buffers|); kept = anchors + buffers + registers in raster order.

The reference hard-codes LLaVA-1.5's grid (W = 24, clamp to 575); we use the grid's width and N - 1, the
same numbers on a 24 x 24 grid. It indexes ``attentions[mm_vision_select_layer]`` (= -2) for the deep
layer, which is the feature layer for LLaVA's -2; we use the feature layer. Its per-image budget is
``int(HIPRUNE_RETENTION / B)`` over the encoder batch (LLaVA-NeXT's crops); here each call gets its own
budget (adapters share a budget over crops). Budget K = ``HIPRUNE_RETENTION`` directly.
"""
from __future__ import annotations

import torch

from ..errors import UserInputError
from ..models.base import VisualTokens
from .base import KeepPlan, PreLLMCompressor
from .registry import COMPRESSORS


def received_attention(tokens: VisualTokens, layer: int | None) -> torch.Tensor:
    """(B, N) attention each patch receives in ``layer``, mean over heads and all 1 + N queries."""
    sig = tokens.layer_signals(layer)
    att = (torch.einsum("bhqd,bhkd->bhqk", sig.queries, sig.keys) * sig.scale).softmax(dim=-1)
    per_crop = att.mean(dim=1).mean(dim=1)[:, 1:]  # (B * crops, N_crop)
    return tokens._join_crops(per_crop.unsqueeze(1)).squeeze(1)


@COMPRESSORS.register()
class HiPrune(PreLLMCompressor):
    name = "hiprune"
    fidelity = "exact vs official code (hand-built and random tensors)"
    paper = "HiPrune, arXiv 2508.00553"
    native_knob = ("HIPRUNE_RETENTION = budget; anchors = round(budget * alpha / 5) at the object layer, "
                   "their 4 raster neighbours as buffers, the rest registers by feature-layer attention")
    requires = ("cls_token",)  # attention signals over [CLS, patches] (the Qwen2.5-VL port is a different path)
    relaxable = True

    def __init__(self, alpha: float = 0.1, object_layer: int = 9, relaxation: str = "none",
                 temperature: float = 0.1):
        if not 0 <= alpha <= 1:
            raise UserInputError(f"alpha must lie in [0, 1], got {alpha!r}")
        if isinstance(object_layer, bool) or not isinstance(object_layer, int) or object_layer < 1:
            raise UserInputError(f"object_layer is 1-based (HIPRUNE_OBJECT_LAYER), got {object_layer!r}")
        self.alpha, self.object_layer = alpha, object_layer
        self._set_relaxation(relaxation, temperature)

    def signal_layers(self) -> tuple[int, ...]:
        return (self.object_layer - 1,)

    def anchors(self, budget: int) -> int:
        return round(budget * self.alpha / 5)

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        return {"budget": budget, "anchors": self.anchors(budget), "alpha": self.alpha,
                "object_layer": self.object_layer, "buffers_and_registers": budget - self.anchors(budget)}

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        B, N = tokens.batch_size, tokens.num_tokens
        width = tokens.grid[1]
        shallow = received_attention(tokens, self.object_layer - 1)
        deep = received_attention(tokens, None)
        n_anchor = self.anchors(budget)
        rows, gains = [], []
        for b in range(B):
            anchor = shallow[b].detach().float().topk(n_anchor).indices
            near = torch.cat([anchor, anchor - 1, anchor + 1, anchor - width, anchor + width]).clamp(0, N - 1)
            near = near.unique()
            n_deep = budget - near.numel()
            if n_deep < 0:
                raise UserInputError(f"hiprune: {near.numel()} anchor and buffer tokens exceed budget {budget} "
                                     f"(alpha={self.alpha}); lower alpha")
            taken = torch.zeros(N, device=deep.device)
            taken[near] = 1.0
            masked = deep[b] - taken
            register = masked.detach().float().topk(n_deep).indices
            index = torch.cat([near, register]).sort().values
            rows.append(index)
            if self.relaxation != "none":
                g = torch.ones(budget, dtype=deep.dtype, device=deep.device)
                if n_anchor:
                    pos = torch.searchsorted(index, anchor.sort().values)
                    g[pos] = self.gains(shallow[b:b + 1], anchor.sort().values.unsqueeze(0), n_anchor)[0]
                if n_deep:
                    pos = torch.searchsorted(index, register.sort().values)
                    g[pos] = self.gains(masked.unsqueeze(0), register.sort().values.unsqueeze(0), n_deep)[0]
                gains.append(g)
        plan = KeepPlan.from_indices(torch.stack(rows), N)
        return plan.scale_rows(torch.stack(gains)) if gains else plan
