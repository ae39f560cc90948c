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

``visionzip_qwen`` is the official port to Qwen2.5-VL, which has no CLS token (dvlab-research/VisionZip @
68993a3, ``Qwen2_5_VL/qwen2_5vl_visionzip.py``):

* score: at the vision encoder's last block (a full-attention block), the softmax attention of the image's
  patches (heads x T x T), averaged over heads, summed over the queries -- the attention each patch receives
  -- then averaged over the 4 patches of each merged token (:meth:`VisualTokens.received_attention`);
* dominant: the top-d merged tokens by that score (no CLS to add);
* contextual: as for LLaVA, on the remaining tokens in raster order, with keys = that block's keys (after
  RoPE) averaged over each token's 4 patches and over heads; the merge acts on the PatchMerger outputs (the
  LLM inputs), i.e. the features here; a contextual token ``target + mean(members)``;
* order: kept tokens stay in raster order, a contextual token at its target's place, each keeping its
  M-RoPE ids (the port slices ``position_ids``). With a single member, the tie between target and member
  weights gives the contextual token the lower index's ids (the port: the target's);
* counts: the port keeps ``int(0.65 N)`` (or ``0.45 N``) dominant and ``max(int(0.05 N), 1)`` contextual
  tokens; for a budget K here c = max(int(0.05 N), 1) (at most K - 1) and d = K - c, so K = 0.7 N and 0.5 N
  reproduce the port's two settings. Qwen2-VL (the same tower without windows) accepts it too.
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
    fidelity = "exact vs official code (hand-built tensors); budget split 54:10"
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

    def _contextual(self, tokens: VisualTokens, rest: torch.Tensor, c: int, slots_out: list | None = None
                    ) -> torch.Tensor:
        """(B, c, N + 1) weights of the contextual tokens built from the remaining patches ``rest``."""
        B, n_rem = rest.shape
        N = tokens.num_tokens
        slots = torch.arange(0, n_rem, max(1, n_rem // c), device=rest.device)[:c]
        is_target = torch.zeros(n_rem, dtype=torch.bool, device=rest.device)
        is_target[slots] = True
        targets, members = rest[:, is_target], rest[:, ~is_target]
        if slots_out is not None:
            slots_out.append(targets)
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


@COMPRESSORS.register()
class VisionZipQwen(VisionZip):
    """VisionZip's official Qwen2.5-VL port: dominant tokens by received attention, no CLS (module docstring)."""

    name = "visionzip_qwen"
    fidelity = "exact vs the official Qwen2.5-VL port, re-stated (random inputs, tiny Qwen towers)"
    paper = "VisionZip, CVPR 2025, arXiv 2412.04467; official Qwen2.5-VL port (Qwen2_5_VL/qwen2_5vl_visionzip.py)"
    native_knob = "contextual = max(int(0.05 N), 1), dominant = budget - contextual (the port's 65 % + 5 %, 45 % + 5 %)"
    requires = ("received_attention",)

    def __init__(self, contextual_fraction: float = 0.05, merge: str = "reference", relaxation: str = "none",
                 temperature: float = 0.1):
        if not 0 <= contextual_fraction < 1:
            raise UserInputError(f"contextual_fraction must be in [0, 1), got {contextual_fraction!r}")
        super().__init__(merge=merge, relaxation=relaxation, temperature=temperature)
        self.contextual_fraction = contextual_fraction

    def split_for(self, budget: int, num_tokens: int) -> tuple[int, int]:
        """(dominant, contextual) for ``budget`` of ``num_tokens`` merged tokens."""
        c = min(max(int(self.contextual_fraction * num_tokens), 1), budget - 1)
        return budget - c, c

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        d, c = self.split_for(budget, num_tokens)
        return {"budget": budget, "dominant": d, "contextual": c, "score": "received attention, last vision layer",
                "cls_kept": False}

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        N = tokens.num_tokens
        d, c = self.split_for(budget, N)
        scores = tokens.received_attention(None)
        dominant = topk_sorted(scores, d)  # (B, d) in raster order
        plan = KeepPlan.from_indices(dominant, N).scale_rows(self.gains(scores, dominant, d))
        anchors = [dominant]
        if c:
            targets: list = []
            plan = KeepPlan(torch.cat([plan.weights, self._contextual(tokens, remaining_indices(dominant, N), c,
                                                                      targets)], dim=1))
            anchors.append(targets[0])
        order = torch.cat(anchors, dim=1).argsort(dim=1)  # raster order, contextual at its target's place
        return KeepPlan(plan.weights.gather(1, order.unsqueeze(-1).expand(-1, -1, plan.weights.shape[-1])))
