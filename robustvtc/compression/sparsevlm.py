"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025).

Rule (reference code Gumpest/SparseVLMs @ 26a5f48, v1.5: ``USE_VERSION`` unset, i.e. its default ``1_0``, the
``RETAIN_TOKN=... bash scripts/v1_5/eval/*.sh`` runs of its README; ``modelling_sparse_llama.py``
``LlamaDynamicvitModel.forward``, ``score.py``, ``utils.py``), for LLaVA-1.5 (576 visual tokens, 32 layers):

* text raters, once, from the LLM input embeddings: R = softmax over text of V T^T (V visual, T the text
  after the image), averaged over visual tokens; raters = text tokens whose relevance exceeds the mean;
* three sparsification stages, after official decoder layers 2, 6, 15 (``pruning_loc``). At each: that layer's
  softmax attention, mean over heads, rows = raters, columns = the visual tokens alive (recycled ones included),
  averaged over raters; the top ``min(k, n - 1)`` are kept (k from ``sparse_token_dict[RETAIN_TOKN]``:
  192 -> 300 / 200 / 110, 128 -> 303 / 110 / 36, 96 -> 238 / 48 / 26, 64 -> 66 / 30 / 17);
* recycling: of the d dropped tokens, the ``int(0.3 d) + 1`` with the highest score (that layer's output hidden
  states) are clustered by DPC-kNN (``cluster_and_merge``) into ``int(m / 10) + 1`` tokens, each the mean of its
  cluster (weights 1 / (count + 1e-6)), placed after the kept visual tokens in cluster-centre order;
* positions renumbered contiguously (``position_ids[:, :new_len]``).

Our layers count like every in-LLM method here: tokens are dropped before decoder layer ``l``, scored with layer
``l - 1``'s attention on ``l - 1``'s output, so the official 2, 6, 15 are ``layers=(3, 7, 16)``.

Budget: ours is the number of visual tokens after the last stage (kept + recycled). The paper's "192 / 128 / 96
/ 64" (``RETAIN_TOKN``) are FLOP-equivalent averages over the 32 layers; on LLaVA-1.5 their schedules leave 113
/ 39 / 27 / 18 visual tokens after layer 15, and those four budgets give exactly the official schedules. Any
other budget K (and any N, the tables scaled by N / 576, floored): the stages of the smallest official setting
that leaves >= K tokens (192's when none does), every stage before the last keeping at least K, and the last
stage keeping the largest k with k + clusters(n - k) = K (which is the official k in all four settings).
:meth:`SparseVLM.budget_mapping` records the setting, the per-stage top-k and the recycled clusters.

Not reproduced: the 1e-6 random density noise of ``cluster_and_merge`` (a tie-break below fp16 resolution for
densities above ~2e-3, so it changes nothing in the official fp16 run but exact ties; left out so that runs are
deterministic), v1.0's adaptive rank-based counts, and v2.0's head selection / RoPE correction.

``stages="one"`` (or giving ``layer``) is the earlier one-stage form: one sparsification layer whose top-k is the
budget, no recycling.
"""
from __future__ import annotations

import torch

from ..errors import UserInputError
from ..models.base import InLLMContext
from .base import InLLMCompressor, topk_sorted
from .registry import COMPRESSORS

OFFICIAL_LAYERS = (3, 7, 16)  # the reference's pruning_loc [2, 6, 15], in our before-layer convention
OFFICIAL_TOKENS = 576
SETTINGS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}  # score.py, v1.x


def text_raters(ctx: InLLMContext) -> torch.Tensor:
    """(B, T) bool: SparseVLM's raters among the (valid) text tokens after the image."""
    emb = ctx.input_embeds.float()
    d = emb.shape[-1]
    v = emb.gather(1, ctx.visual_index.unsqueeze(-1).expand(-1, -1, d))
    t = emb.gather(1, ctx.text_index.unsqueeze(-1).expand(-1, -1, d))
    logits = (v @ t.transpose(1, 2)).masked_fill(~ctx.text_valid.unsqueeze(1), float("-inf"))
    relevance = logits.softmax(dim=-1).mean(dim=1)  # (B, T), 0 at padding
    valid = ctx.text_valid.float()
    mean = (relevance * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
    raters = (relevance > mean) & ctx.text_valid
    # all relevances equal -> no rater above the mean: fall back to every text token
    return torch.where(raters.any(-1, keepdim=True), raters, ctx.text_valid)


def recycled_count(dropped: int) -> int:
    """Dropped tokens the reference recycles: ``int(d * 0.3) + 1`` (the top 30 % by score)."""
    return int(dropped * 0.3) + 1


def cluster_count(dropped: int) -> int:
    """Merged tokens the reference makes of ``dropped`` dropped tokens: ``int(m / 10) + 1`` of m recycled."""
    return int(recycled_count(dropped) / 10) + 1 if dropped > 0 else 0


def after_stage(alive: int, k: int) -> int:
    """Visual tokens after a stage keeping the top ``k`` of ``alive``: k + its recycled clusters."""
    return k + cluster_count(alive - k)


def topk_for(alive: int, left: int) -> int:
    """The largest top-k with ``after_stage(alive, k) == left`` (the official k in every official stage)."""
    for k in range(min(left, alive - 1), 0, -1):
        if after_stage(alive, k) == left:
            return k
    raise UserInputError(f"sparsevlm cannot leave {left} of {alive} visual tokens after a stage (kept + recycled)")


def dpc_knn_clusters(x: torch.Tensor, cluster_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``cluster_and_merge`` (DPC-kNN) on (B, m, C) tokens, without its 1e-6 density noise:
    (centres (B, cluster_num) in its order, assignment (B, m) of each token to a centre's slot)."""
    b, m, c = x.shape
    rows = max(1, (1 << 26) // max(1, b * m * c))  # the reference's broadcast difference, a block of rows at a time
    dist = torch.cat([(x[:, i:i + rows, None] - x[:, None]).norm(dim=-1, p=2) for i in range(0, m, rows)], dim=1)
    dist = dist / (c ** 0.5)
    nearest = dist.topk(k=cluster_num, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    higher = (density[:, None, :] > density[:, :, None]).to(x.dtype)
    dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
    parent_dist = (dist * higher + dist_max * (1 - higher)).min(dim=-1)[0]
    centres = (parent_dist * density).topk(k=cluster_num, dim=-1).indices
    assign = dist.gather(1, centres.unsqueeze(-1).expand(-1, -1, dist.shape[-1])).argmin(dim=1)
    batch = torch.arange(b, device=x.device)[:, None].expand(b, cluster_num)
    assign[batch.reshape(-1), centres.reshape(-1)] = torch.arange(cluster_num, device=x.device).repeat(b)
    return centres, assign


def dpc_knn_weights(x: torch.Tensor, cluster_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres (B, cluster_num), merge weights (B, cluster_num, m)): merged token j = weights[:, j] @ x, each
    member weighted 1 / (count + 1e-6) as the reference's ``index_add_`` mean, in x's dtype."""
    centres, assign = dpc_knn_clusters(x, cluster_num)
    member = torch.nn.functional.one_hot(assign, cluster_num).transpose(1, 2).to(x.dtype)  # (B, c, m)
    count = member.sum(-1, keepdim=True) + 1e-6
    return centres, member / count


def official_stage(hidden: torch.Tensor, visual_index: torch.Tensor, scores: torch.Tensor, left: int, gains=None):
    """One official stage: (places, gains, merge (B, left, n)) for ``left`` visual tokens (kept + recycled)
    out of the n alive at ``visual_index`` with ``scores`` (B, n); ``hidden`` is the layer's output."""
    b, n = scores.shape
    k = topk_for(n, left)
    kept = topk_sorted(scores, k)  # the reference's top-k mask, read in sequence order
    dropped = torch.ones(b, n, dtype=torch.bool, device=scores.device).scatter(1, kept, False)
    dropped = torch.arange(n, device=scores.device).expand(b, n)[dropped].view(b, n - k)  # ascending
    m, c = recycled_count(n - k), cluster_count(n - k)
    recycled = dropped.gather(1, scores.detach().gather(1, dropped).topk(m, dim=1).indices)  # score order
    d = hidden.shape[-1]
    x = hidden.detach().gather(1, visual_index.gather(1, recycled).unsqueeze(-1).expand(-1, -1, d))
    centres, w = dpc_knn_weights(x, c)
    merge = torch.zeros(b, k + c, n, dtype=hidden.dtype, device=hidden.device)
    merge[:, :k].scatter_(2, kept.unsqueeze(-1), 1.0)
    merge[:, k:].scatter_(2, recycled.unsqueeze(1).expand(-1, c, -1), w)
    places = torch.cat([kept, recycled.gather(1, centres)], dim=1).sort(dim=1).values
    gain = gains(scores, kept, k) if gains is not None else None
    if gain is not None:
        gain = torch.cat([gain, gain.new_ones(b, c)], dim=1)
    return places, gain, merge


@COMPRESSORS.register()
class SparseVLM(InLLMCompressor):
    name = "sparsevlm"
    fidelity = ("v1.5 official rule on LLaVA-1.5: 3 stages (official layers 2/6/15) with the budget tables and "
                "DPC-kNN recycling of 30 % of the dropped tokens; without the clustering's 1e-6 random tie-break "
                "noise; other budgets/token counts by a stated extension of the tables; stages='one': one stage, "
                "no recycling")
    paper = "SparseVLM, ICML 2025, arXiv 2410.04417"
    text_aware = True
    position_policy = "contiguous"
    native_knob = ("per-stage top-k tables for RETAIN_TOKN 192/128/96/64 (budget = tokens left after the last stage: "
                   "113/39/27/18 on LLaVA-1.5); stages='one': one sparsification layer keeping the budget")
    relaxable = True

    def __init__(self, stages: str | None = None, layer: int | None = None, layers: tuple[int, ...] = OFFICIAL_LAYERS,
                 relaxation: str = "none", temperature: float = 0.1):
        if stages is None:
            stages = "one" if layer is not None else "multi"
        if stages not in ("one", "multi"):
            raise UserInputError(f"unknown sparsevlm stages {stages!r}; accepted: multi (official v1.5), one")
        if stages == "multi":
            if layer is not None:
                raise UserInputError("sparsevlm: layer= is the one-stage form's knob; accepted: stages='one' with "
                                     "layer=, or stages='multi' with layers= (3 layers)")
            layers = tuple(int(x) for x in layers)
            if len(layers) != len(next(iter(SETTINGS.values()))) or list(layers) != sorted(set(layers)):
                raise UserInputError(f"sparsevlm layers must be 3 increasing decoder layers, got {layers!r}")
        self.stages = stages
        self.layer = (3 if layer is None else layer) if stages == "one" else layers[-1]
        self.layers = layers if stages == "multi" else (self.layer,)
        self._set_relaxation(relaxation, temperature)

    # ---------------------------------------------------------------------------------------------- schedule
    def _plan(self, budget: int, num_tokens: int) -> tuple[int | None, list[int], list[int]]:
        """(official setting or None when the budget is beyond them all, per-stage top-k, per-stage tokens left)."""
        def run(tops):
            alive, ks, left = num_tokens, [], []
            for k in tops:
                k = min(k, alive - 1)
                alive = after_stage(alive, k)
                ks.append(k)
                left.append(alive)
            return ks, left

        scaled = {s: [t * num_tokens // OFFICIAL_TOKENS for t in tops] for s, tops in SETTINGS.items()}
        reach = sorted((run(tops)[1][-1], s) for s, tops in scaled.items())
        setting = next((s for final, s in reach if final >= budget), None)
        tops = scaled[setting if setting is not None else max(SETTINGS)]
        alive, ks, left = num_tokens, [], []
        for i, t in enumerate(tops):
            if i < len(tops) - 1:
                k = min(max(t, budget), alive - 1)
            else:
                lowest = after_stage(alive, 1) if alive > 1 else alive
                if not lowest <= budget <= alive:
                    raise UserInputError(f"sparsevlm budget {budget} out of range for {num_tokens} visual tokens: the "
                                         f"last stage leaves {lowest}..{alive} (kept + recycled)")
                k = topk_for(alive, budget)
            alive = after_stage(alive, k)
            ks.append(k)
            left.append(alive)
        return setting, ks, left

    def schedule(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict[int, int]:
        if self.stages == "one":
            return {self.layer: budget}
        return dict(zip(self.layers, self._plan(budget, num_tokens)[2]))

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        out = {**super().budget_mapping(budget, num_tokens, num_layers), "stages": self.stages,
               "paper_layers": [x - 1 for x in self.layers]}
        if self.stages == "one":
            return {**out, "paper_layer": self.layer - 1}
        setting, ks, left = self._plan(budget, num_tokens)
        alive = [num_tokens] + left[:-1]
        return {**out, "paper_setting": setting, "topk_per_layer": ks,
                "recycled_per_layer": [recycled_count(n - k) for n, k in zip(alive, ks)],
                "clusters_per_layer": [cluster_count(n - k) for n, k in zip(alive, ks)],
                "exact_official_schedule": num_tokens == OFFICIAL_TOKENS and setting is not None
                and ks == list(SETTINGS[setting])}

    # ---------------------------------------------------------------------------------------------- rule
    def raters(self, ctx: InLLMContext) -> torch.Tensor:
        """(B, T) the raters, chosen at the first stage (input layout) and reused by the later ones."""
        if "raters" not in ctx.memo:
            if ctx.hidden.shape[1] != ctx.input_embeds.shape[1]:
                raise RuntimeError("sparsevlm chooses its raters at the first pruning point (input layout expected)")
            ctx.memo["raters"] = text_raters(ctx)
        return ctx.memo["raters"]

    def scores(self, ctx: InLLMContext) -> torch.Tensor:
        raters = self.raters(ctx).float()
        rows = ctx.attention_rows(ctx.text_index).gather(
            2, ctx.visual_index.unsqueeze(1).expand(-1, raters.shape[1], -1))  # (B, T, K)
        return (rows * raters.unsqueeze(-1)).sum(1) / raters.sum(-1, keepdim=True)

    def select(self, ctx: InLLMContext, keep: int):
        if self.stages == "one":
            return super().select(ctx, keep)
        scores = self.scores(ctx)
        return official_stage(ctx.hidden, ctx.visual_index, scores, keep, self.gains)
