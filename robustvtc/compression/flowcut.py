"""FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language
Models", NeurIPS 2025, arXiv 2505.19536).

Rule (reference code TungChintao/FlowCut @ a2ecd24, ``flowcut/modeling_clip_flowcut.py``,
``flowcut/utils_flowcut.py``, ``flowcut/main.py``; LLaVA-1.5 path), progressive pruning inside the CLIP
encoder up to LLaVA's feature layer s (the reference's ``select_layer = len(layers) - 2``). The target is
t = K + 1 tokens (K patches + CLS, which stays to be scored with and is dropped at the end). After encoder
layer i (attention + MLP), with ``rpl = s - i - 1`` layers left, while more than t tokens remain:

* per layer scores, per head then averaged: CLS attention a = softmax(q k^T / sqrt(d))[CLS, patches];
  "semantic" attention m = softmax over all tokens of v_CLS . v_j (values, no scaling), patches only;
  value norm n = L1 norm of the head-mean value;
* score = (a / sum a + m / sum m) * n; cumulative score c = score the first time, then 0.5 c + 0.5 score;
* when rpl is even: prune p = round((N_cur - K) / sqrt(rpl) * (1 - H^2)) tokens (H = entropy of a / sum a
  divided by log N_cur), or down to t when rpl = 0; keep max(T_cur - p, t) - 1 patches by top cumulative
  score (raster order kept) plus CLS; the cumulative scores follow the kept tokens.

The reference takes the max of p over the batch (items of one batch prune alike); LLaVA evaluates one image
at a time, and so do we: each image is pruned as it would be alone. Its ``all_keep_indices`` bookkeeping
indexes [CLS, patches] with patch positions (off by one); it only feeds the LLaVA-NeXT layout, and we track
the kept patches directly. Not reproduced: the LLaVA-NeXT ("anyres") path, which keeps int(K / 2) per crop
in the encoder and prunes again inside the LLM at layer 1, and the Qwen2-VL port. Re-runs the encoder by
hand, so it needs a CLIP-style tower (like ToMe); the budget is the reference's ``target_num`` directly.
"""
from __future__ import annotations

import torch

from ..errors import UserInputError
from .base import EncoderCompressor, KeepPlan
from .registry import COMPRESSORS


def flow_score(cls_attn: torch.Tensor, semantic: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """FlowCut's per-layer score of the patches: (B, N) CLS attention, (B, N) semantic attention, (B, N, d)."""
    relation = cls_attn / cls_attn.sum(dim=-1, keepdim=True)
    semantic = semantic / semantic.sum(dim=-1, keepdim=True)
    return (relation + semantic) * values.norm(p=1, dim=-1)


def adaptive_prune_count(cls_attn: torch.Tensor, rpl: int, target_patches: int) -> int:
    """Tokens to prune now for one image: (N - target) / sqrt(rpl) * (1 - normalised entropy^2), rounded."""
    n = cls_attn.shape[-1]
    prob = cls_attn / cls_attn.sum(dim=-1, keepdim=True)
    entropy = -(prob * prob.log()).sum(dim=-1)
    ratio = entropy / torch.log(torch.tensor(float(n)))
    r = (n - target_patches) / rpl ** 0.5 * (1 - ratio ** 2)
    return int(r.max().round())


@COMPRESSORS.register()
class FlowCut(EncoderCompressor):
    name = "flowcut"
    fidelity = "exact vs official code on the tiny CLIP (LLaVA-1.5 path; no anyres/Qwen port)"
    paper = "FlowCut, NeurIPS 2025, arXiv 2505.19536"
    native_knob = ("target_num = budget; pruned progressively after every other encoder layer (entropy-adaptive "
                   "count), down to the budget after the layer before the feature layer")
    requires = ("cls_token", "encoder_rerun")

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        out = {"budget": budget, "target_tokens_with_cls": budget + 1}
        if num_layers is not None:  # layers up to and including the feature layer
            s = num_layers - 1
            out["prune_after_layers"] = [i for i in range(s) if (s - i - 1) % 2 == 0]
        return out

    def check_model(self, adapter) -> None:
        if adapter.feature_layer < 1:
            raise UserInputError("flowcut prunes after the layers before the feature layer; this encoder's feature "
                                 "layer is its first")

    def compress_pixels(self, adapter, pixels: torch.Tensor, budget: int) -> tuple[torch.Tensor, KeepPlan]:
        budget = self.check_budget(budget, adapter.num_visual_tokens)
        self.check_model(adapter)
        select = adapter.feature_layer
        tower = adapter.model.model.vision_tower
        vision = getattr(tower, "vision_model", tower)
        x = vision.pre_layrnorm(vision.embeddings(adapter.normalize(adapter.check_pixels(pixels))))
        layers = vision.encoder.layers[: select + 1]
        feats, kept = [], []
        for b in range(x.shape[0]):
            f, k = self._one(layers, x[b:b + 1], select, budget + 1)
            feats.append(f)
            kept.append(k)
        plan = KeepPlan.from_indices(torch.stack(kept), adapter.num_visual_tokens, space="encoder")
        return adapter.project(torch.cat(feats)), plan

    def _one(self, layers, h: torch.Tensor, select: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image (1, 1 + N, D) through the layers; the kept patch features (1, K, D) and their indices (K,)."""
        keep = torch.arange(h.shape[1] - 1, device=h.device)
        cumulative = None
        for i, layer in enumerate(layers):
            rpl = select - i - 1
            out, cls_attn, semantic, values = _attention(layer.self_attn, layer.layer_norm1(h))
            h = h + out
            h = h + layer.mlp(layer.layer_norm2(h))
            if h.shape[1] <= target:
                continue
            score = flow_score(cls_attn, semantic[:, 1:], values[:, 1:])
            cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
            if rpl % 2 == 0:
                prune = adaptive_prune_count(cls_attn, rpl, target - 1) if rpl else h.shape[1]
                n_keep = max(h.shape[1] - prune, target) - 1
                idx = cumulative.topk(n_keep, dim=1).indices.sort(dim=1).values  # (1, n_keep)
                h = torch.cat([h[:, :1], h[:, 1:].gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))], 1)
                cumulative = cumulative.gather(1, idx)
                keep = keep[idx[0]]
        return h[:, 1:], keep


def _attention(attn, h: torch.Tensor):
    """CLIP self-attention plus FlowCut's signals (detached): output, CLS attention (B, N), semantic attention
    over all tokens (B, 1 + N), head-mean values (B, 1 + N, d)."""
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q, k, v = (proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    probs = (q * attn.scale @ k.transpose(-1, -2)).softmax(dim=-1)
    out = attn.out_proj((probs @ v).transpose(1, 2).reshape(*h.shape[:-1], -1))
    with torch.no_grad():
        vd = v.detach().float()
        cls_attn = probs.detach().float()[:, :, 0, 1:].mean(dim=1)
        semantic = (vd[:, :, :1] @ vd.transpose(-1, -2)).softmax(dim=-1).squeeze(2).mean(dim=1)
        values = vd.mean(dim=1)
    return out, cls_attn, semantic, values
