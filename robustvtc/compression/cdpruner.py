"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
in MLLMs", NeurIPS 2025, arXiv 2506.10967) -- its selection rule, NOT registered as a compressor.

Rule (reference code Theia-4869/CDPruner @ 9541616, ``llava/model/llava_arch.py`` ``encode_images`` and
``llava/model/multimodal_encoder/clip_encoder.py``), for K = ``visual_token_num``:

* similarity S = cosine similarity of the *projected* visual tokens (mm_projector output), float32;
* relevance: image embeds = CLIP ``visual_projection(post_layernorm(feature-layer patches))``, text embeds =
  CLIP text tower ``text_embeds`` of the instruction (one per 77-token segment); r_i = mean over segments
  of -cos(image_i, text_m), then (r - min r + 1e-6) / (max r - min r) with min and max over the whole
  encoder batch (one image, or all crops of one LLaVA-NeXT image);
* kernel L = diag(r) S diag(r) (the reference leaves theta's exp(alpha r) re-weighting commented out);
* greedy fast MAP inference of the DPP (Chen et al. 2018) for K steps: pick argmax of the residual
  diagonal, orthogonalise, no epsilon; kept indices sorted (raster order), no merging. With no epsilon, a
  budget above the kernel's rank (projected dimension < N, e.g. tiny models) drives the residuals to <= 0 and
  the reference to NaNs and repeated picks; LLaVA's 4096-d projections of 576 tokens do not reach that.

Why it is not registered: robustvtc's pre-LLM compressors see only :class:`VisualTokens` (vision features,
CLS, encoder queries/keys) -- no instruction text reaches them (``Target.forward`` and the adapters'
``compress`` carry no question), and no adapter loads CLIP's text tower and ``visual_projection`` (llava-hf
checkpoints do not ship them; the reference loads them from the CLIP checkpoint separately). Without the
relevance there is no CDPruner, and a substitute would be a rule of our own. What is here is exact and
tested: the relevance from given embeddings, the kernel and the greedy MAP. To register it, adapters must
expose the instruction to pre-LLM compressors plus either CLIP's text/image projections (the reference) or,
for models without a CLIP text tower, the OpenVINO GenAI port's choice (LLM input embeddings of the text vs.
projected visual tokens, per-image min-max with +1e-6 in the denominator, theta = 0.5, +1e-5 under the
square roots) -- a different rule that would need its own name.
"""
from __future__ import annotations

import torch


def relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(B, N) CDPruner relevance of image embeds (B, N, C) to text embeds (M, C), min-max over the whole batch."""
    image = image_embeds.float() / image_embeds.float().norm(dim=-1, keepdim=True)
    text = text_embeds.float() / text_embeds.float().norm(dim=-1, keepdim=True)
    r = (-(image @ text.t())).mean(dim=-1)
    return (r - r.min() + 1e-6) / (r.max() - r.min())


def conditional_kernel(rel: torch.Tensor, projected: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """(B, N, N) kernel r_i S_ij r_j, S the cosine similarity of ``projected`` (B, N, D). ``theta``: the
    reference's commented-out option r -> exp(theta / (2 (1 - theta)) r); None = as the reference runs."""
    x = projected / projected.norm(dim=-1, keepdim=True)
    x = x.float()
    similarity = x @ x.transpose(1, 2)
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    return rel.unsqueeze(2) * similarity * rel.unsqueeze(1)


def fast_map_dpp(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices chosen by greedy DPP MAP inference on ``kernel`` (B, N, N), sorted ascending."""
    B, N, _ = kernel.shape
    rows = torch.arange(B, device=kernel.device)
    cis = torch.zeros(k, B, N, device=kernel.device, dtype=kernel.dtype)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    chosen = torch.empty(k, B, dtype=torch.long, device=kernel.device)
    for i in range(k):
        j = di2s.argmax(dim=-1)
        chosen[i] = j
        proj = torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])
        eis = (kernel[rows, j] - proj) / di2s[rows, j].sqrt().unsqueeze(-1)
        cis[i] = eis
        di2s = di2s - eis.square()
        di2s[rows, j] = -float("inf")
    return chosen.t().sort(dim=-1).values


def cdpruner_select(projected: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                    k: int) -> torch.Tensor:
    """The reference's kept indices (B, k) for one encoder batch: projected tokens (B, N, D), CLIP image embeds
    (B, N, C) and the instruction's CLIP text embeds (M, C)."""
    return fast_map_dpp(conditional_kernel(relevance(image_embeds, text_embeds), projected), k)
