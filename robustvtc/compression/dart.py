"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", EMNLP 2025).

Rule (reference code ZichenWen1/DART ``get_retained_image_token``, read via its fork and the llmc port),
before decoder layer K (default 2), scored with layer K - 1:

* pivots: the ``pivot_image`` (4) visual and ``pivot_text`` (4) text tokens (text after the image) with
  the largest L1 norm of layer K - 1's keys (after RoPE, heads concatenated);
* for each pivot in turn, the still-unpicked non-pivot visual tokens *least* cosine-similar to it, on the
  hidden states after layer K - 1 passed through the final RMSNorm, are picked;
* kept = visual pivots + all picks (text pivots only guide), original RoPE positions, no merge.

Budget: the reference picks t = B // 8 per pivot (B = ``max_num_trunction``, 128 -> 4 + 8 * 16 = 132
kept). We keep exactly K: the image pivots plus K - pivots picks shared out evenly, the first pivots
taking one more when it does not divide -- the reference's count whenever K = 4 + 8t. Pivots are visited
in sequence order (the reference iterates a Python set, whose order is an artefact of hashing).
Not score-ranked (no relaxation): picks are argmins of similarity to pivots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..models.base import InLLMContext, split_budget
from .base import InLLMCompressor
from .registry import COMPRESSORS


@COMPRESSORS.register()
class DART(InLLMCompressor):
    name = "dart"
    fidelity = "exact; DART visits pivots in a documented different order (sequence, not set order)"
    paper = "DART, EMNLP 2025, arXiv 2502.11494"
    text_aware = True
    native_knob = "budget = image pivots + picks (reference max_num_trunction B <-> budget 4 + 8 * (B // 8))"

    def __init__(self, layer: int = 2, pivot_image: int = 4, pivot_text: int = 4):
        if pivot_image < 1 or pivot_text < 0:
            raise UserInputError(f"need pivot_image >= 1 and pivot_text >= 0, got {pivot_image}, {pivot_text}")
        self.layer, self.pivot_image, self.pivot_text = layer, pivot_image, pivot_text

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        n_img = min(self.pivot_image, budget)
        picks = split_budget(budget - n_img, n_img + self.pivot_text)
        return {**super().budget_mapping(budget, num_tokens, num_layers), "image_pivots": n_img,
                "text_pivots": self.pivot_text, "picks_per_pivot": picks,
                "reference_max_num_trunction": 8 * picks[0] if len(set(picks)) == 1 else None}

    def select(self, ctx: InLLMContext, keep: int) -> tuple[torch.Tensor, None]:
        keys = ctx.previous_keys()
        l1 = keys.transpose(1, 2).flatten(2).abs().sum(-1).float()  # (B, L)
        states = F.normalize(ctx.final_norm(ctx.hidden).detach().float(), dim=-1)
        rows = [self._select_one(l1[b], states[b], ctx.visual_index[b], ctx.text_index[b][ctx.text_valid[b]], keep)
                for b in range(ctx.hidden.shape[0])]
        return torch.stack(rows), None

    def _select_one(self, l1, states, vis, txt, keep: int) -> torch.Tensor:
        n_img = min(self.pivot_image, keep)
        img_pivots = l1[vis].topk(n_img).indices  # columns of vis
        txt_pivots = txt[l1[txt].topk(min(self.pivot_text, txt.numel())).indices]
        pivots = torch.cat([vis[img_pivots], txt_pivots]).sort().values  # sequence positions
        free = torch.ones(vis.numel(), dtype=torch.bool, device=vis.device)
        free[img_pivots] = False
        picked = [img_pivots]
        candidates = states[vis]
        for pos, t in zip(pivots.tolist(), split_budget(keep - n_img, pivots.numel())):
            if t:
                sim = (candidates @ states[pos]).masked_fill(~free, float("inf"))
                chosen = sim.topk(t, largest=False).indices
                free[chosen] = False
                picked.append(chosen)
        return torch.cat(picked).sort().values
