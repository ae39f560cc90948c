"""ToMe, token merging by bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

Rule (reference code facebookresearch/ToMe, ``tome/merge.py`` and ``tome/patch/timm.py``), in every
encoder layer up to LLaVA's feature layer, between attention and MLP:

* metric = the layer's keys averaged over heads, L2-normalised; tokens split alternately into A (even)
  and B (odd); each A token's best match in B by cosine; the r A tokens with the highest match are merged
  into their B partner; CLS is protected (its scores are -inf) and at most half the tokens go per layer;
* merge = size-weighted average, sizes accumulate; proportional attention adds log(size) to the attention
  logits (ToMe's default, ``prop_attn=True``; the llmc CLIP port has neither);
* output order ``[unmerged A (original order, CLS first), B]``: raster order is lost.

Budget K: the N - K removals are spread as evenly as the 50 % cap allows over the layers that feed the
feature layer (earlier layers take the remainder). Budgets below what halving every layer can reach raise.
The keep plan records provenance (which original patches each merged token averages), space "encoder".
This re-runs the encoder's modules by hand, so it needs a CLIP-style tower (as ToMe's own patches are
written per architecture).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from .base import EncoderCompressor, KeepPlan
from .registry import COMPRESSORS


def _most_removable(tokens: int, layers: int) -> int:
    """Patches ToMe can remove from ``tokens`` (+ CLS) in ``layers`` layers, halving the matchable ones each."""
    t, removed = tokens + 1, 0
    for _ in range(layers):
        r = (t - 1) // 2
        t, removed = t - r, removed + r
    return removed


def merge_schedule(num_tokens: int, budget: int, num_layers: int) -> list[int]:
    """Tokens removed per layer (r_l) so that ``num_tokens`` patches (+ protected CLS) end at ``budget``: as even
    as possible (ToMe's constant r), a layer taking more only where the later layers' 50 % caps could not finish."""
    if num_tokens - budget > _most_removable(num_tokens, num_layers):
        raise UserInputError(f"tome cannot reach budget {budget} in {num_layers} encoder layers (at most half the "
                             f"tokens merge per layer); accepted: "
                             f"{num_tokens - _most_removable(num_tokens, num_layers)}..{num_tokens}")
    t, left, plan = num_tokens + 1, num_tokens - budget, []
    for layer in range(num_layers):
        later = num_layers - layer - 1
        r = math.ceil(left / (later + 1))
        while r < (t - 1) // 2 and left - r > _most_removable(t - 1 - r, later):
            r += 1
        r = min(r, (t - 1) // 2, left)
        plan.append(r)
        t, left = t - r, left - r
    return plan


def bipartite_soft_matching(metric: torch.Tensor, r: int):
    """ToMe's matching on (B, T, C) metric with CLS at index 0: a function merging (B, T, D) -> (B, T - r, D) by sum."""
    with torch.no_grad():
        metric = F.normalize(metric.float(), dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        scores[:, 0, :] = float("-inf")
        node_max, node_idx = scores.max(dim=-1)
        edge = node_max.argsort(dim=-1, descending=True, stable=True).unsqueeze(-1)
        unm, src = edge[:, r:].sort(dim=1).values, edge[:, :r]
        dst = node_idx.unsqueeze(-1).gather(1, src)

    def merge(x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        c = x.shape[-1]
        kept = a.gather(1, unm.expand(-1, -1, c))
        b = b.scatter_reduce(1, dst.expand(-1, -1, c), a.gather(1, src.expand(-1, -1, c)), reduce="sum")
        return torch.cat([kept, b], dim=1)

    return merge


@COMPRESSORS.register()
class ToMe(EncoderCompressor):
    name = "tome"
    fidelity = "exact matching and merge (hand-built); N - K removals spread over the layers"
    paper = "ToMe, ICLR 2023, arXiv 2210.09461"
    native_knob = "r per layer, spread so that N - sum(r) = budget over the layers up to the feature layer"
    requires = ("cls_token", "encoder_rerun")

    def __init__(self, prop_attn: bool = True):
        self.prop_attn = prop_attn

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        out = {"budget": budget, "removed": num_tokens - budget}
        if num_layers is not None:
            out["r_per_layer"] = merge_schedule(num_tokens, budget, num_layers)
        return out

    def compress_pixels(self, adapter, pixels: torch.Tensor, budget: int) -> tuple[torch.Tensor, KeepPlan]:
        budget = self.check_budget(budget, adapter.num_visual_tokens)
        tower = adapter.model.model.vision_tower
        vision = getattr(tower, "vision_model", tower)
        x = vision.pre_layrnorm(vision.embeddings(adapter.normalize(adapter.check_pixels(pixels))))
        B, T, _ = x.shape
        size = torch.ones(B, T, 1, dtype=x.dtype, device=x.device)
        source = torch.eye(T, dtype=x.dtype, device=x.device).expand(B, T, T)  # provenance over [CLS, patches]
        schedule = merge_schedule(T - 1, budget, adapter.feature_layer + 1)
        for layer, r in zip(vision.encoder.layers, schedule):
            out, metric = self._attention(layer.self_attn, layer.layer_norm1(x), size)
            x = x + out
            if r:
                merge = bipartite_soft_matching(metric, r)
                x, size, source = merge(x * size), merge(size), merge(source)
                x = x / size
            x = x + layer.mlp(layer.layer_norm2(x))
        weights = source[:, 1:] / source[:, 1:].sum(-1, keepdim=True)  # (B, K, 1 + N): CLS column first
        weights = torch.cat([weights[..., 1:], weights[..., :1]], dim=-1)
        return adapter.project(x[:, 1:]), KeepPlan(weights.float().detach(), space="encoder")

    def _attention(self, attn, h: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP self-attention with ToMe's proportional attention; also the head-mean keys (the metric)."""
        shape = (*h.shape[:-1], -1, attn.head_dim)
        q, k, v = (proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = q @ k.transpose(-1, -2) * attn.scale
        if self.prop_attn:
            logits = logits + size.log().view(size.shape[0], 1, 1, -1)
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(*h.shape[:-1], -1)
        return attn.out_proj(out), k.mean(dim=1)
