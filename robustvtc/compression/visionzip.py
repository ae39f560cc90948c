"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025).

Rule (reference code dvlab-research/VisionZip, ``visionzip/utils.py``), on the feature layer:

* dominant: the CLS token itself plus the top-(d-1) patches by CLS->patch attention summed over heads,
  in raster order with CLS first (LLaVA never feeds CLS otherwise: VisionZip does);
* contextual: among the remaining patches (raster order) c targets at stride floor(n_rem / c) from 0; every
  other remaining patch joins the target whose head-mean key is most cosine-similar; a contextual token is
  ``target + mean(members)`` as the reference code computes it (``merge="mean"`` gives the true average
  ``(target + sum(members)) / (1 + n)``). Reference-mode rows therefore sum to 2 (1 without members).

Budget K splits as d : c = 54 : 10, the README's 64 = 54 + 10 (paper: 108 + 20 for 128, 162 + 30 for 192;
CIRA's 27 + 5 for 32): d = round(K * 54 / 64), c = K - d.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..models.base import VisualTokens
from .base import KeepPlan, PreLLMCompressor, remaining_indices, topk_sorted
from .registry import COMPRESSORS

MERGES = ("reference", "mean")


@COMPRESSORS.register()
class VisionZip(PreLLMCompressor):
    name = "visionzip"
    paper = "VisionZip, CVPR 2025, arXiv 2412.04467"
    native_knob = "dominant + contextual = budget, split 54:10 (dominant counts the CLS token)"
    requires = ("cls_token",)
    relaxable = True

    def __init__(self, ratio: tuple[int, int] = (54, 10), merge: str = "reference", relaxation: str = "none",
                 temperature: float = 0.1):
        if len(ratio) != 2 or min(ratio) < 0 or ratio[0] <= 0:
            raise UserInputError(f"ratio must be (dominant, contextual) with dominant > 0, got {ratio!r}")
        if merge not in MERGES:
            raise UserInputError(f"unknown merge {merge!r}; accepted: {', '.join(MERGES)}")
        self.ratio, self.merge = tuple(ratio), merge
        self._set_relaxation(relaxation, temperature)

    @property
    def normalized_plan(self) -> bool:  # type: ignore[override]
        return self.merge == "mean"

    def split(self, budget: int) -> tuple[int, int]:
        """(dominant incl. CLS, contextual) for ``budget``."""
        d = math.floor(budget * self.ratio[0] / sum(self.ratio) + 0.5)
        d = min(max(d, 1), budget)
        return d, budget - d

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        d, c = self.split(budget)
        return {"budget": budget, "dominant": d, "contextual": c, "dominant_patches": d - 1, "cls_kept": True}

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        d, c = self.split(budget)
        B, N = tokens.batch_size, tokens.num_tokens
        device = tokens.features.device
        scores = tokens.cls_attention(None, reduce="sum")
        dominant = topk_sorted(scores, d - 1)  # (B, d-1)
        cls = torch.full((B, 1), N, dtype=torch.long, device=device)
        weights = [KeepPlan.from_indices(torch.cat([cls, dominant], 1), N).weights]
        if c:
            weights.append(self._contextual(tokens, remaining_indices(dominant, N), c))
        plan = KeepPlan(torch.cat(weights, dim=1))
        return plan.scale_rows(self.gains(scores, dominant, d - 1), start=1) if d > 1 else plan

    def _contextual(self, tokens: VisualTokens, rest: torch.Tensor, c: int) -> torch.Tensor:
        """(B, c, N + 1) weights of the contextual tokens built from the remaining patches ``rest``."""
        B, n_rem = rest.shape
        N = tokens.num_tokens
        slots = torch.arange(0, n_rem, max(1, n_rem // c), device=rest.device)[:c]
        is_target = torch.zeros(n_rem, dtype=torch.bool, device=rest.device)
        is_target[slots] = True
        targets, members = rest[:, is_target], rest[:, ~is_target]
        keys = F.normalize(tokens.keys(None, reduce="mean").detach().float(), dim=-1)
        k_t = keys.gather(1, targets.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
        k_m = keys.gather(1, members.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
        assign = (k_m @ k_t.transpose(1, 2)).argmax(dim=-1)  # (B, n_members) target slot of each member
        onehot = F.one_hot(assign, c).float().transpose(1, 2)  # (B, c, n_members)
        counts = onehot.sum(-1, keepdim=True)
        w = torch.zeros(B, c, N + 1, device=rest.device)
        if self.merge == "reference":
            w.scatter_(2, members.unsqueeze(1).expand(-1, c, -1), onehot / counts.clamp(min=1))
            w.scatter_(2, targets.unsqueeze(-1), 1.0)
        else:
            w.scatter_(2, members.unsqueeze(1).expand(-1, c, -1), onehot / (1 + counts))
            w.scatter_(2, targets.unsqueeze(-1), 1 / (1 + counts))
        return w
