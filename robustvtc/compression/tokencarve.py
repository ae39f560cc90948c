"""TokenCarve (Tan et al., "TokenCarve: Information-Preserving Visual Token Compression in Multimodal Large
Language Models", arXiv 2503.10501): in-LLM selection and merge, registered as ``tokencarve``.

Rule (reference code ShawnTan86/TokenCarve @ a57bd59, ``TokenCarve/modeling_llama.py`` ``LlamaModel.forward``,
``TokenCarve/TokenCarve_model_vqa_loader.py`` for the arguments), batch size 1, at the input of decoder layer
``work_layer`` (default 2), for K = ``token_carve_image_token_nums`` (default 64):

* R = int(K / 2 * 3) candidates, M = int(K / 2) merges (the loader's ``image_token_rank`` and
  ``merge_token_nums``);
* attention value (AV): layer ``work_layer - 1``'s attention, mean over heads, row of the last prompt token,
  over the N image tokens;
* singular value (SV): the image rows X (N x D, float32) of that layer's output hidden states; U S of
  ``torch.linalg.svd(X)``; a token's score is the L1 norm of its row of U S;
* rank fusion: with both lists sorted descending, the i-th token of each list gets N - i points, weighted
  ``w`` (AV) and ``1 - w`` (SV), ``w`` = ``SV_AV_weight`` = 0.5; mode 0 (TokenCarve) keeps the top R by
  points (``topk`` order: descending points), mode 1 the top R by SV, mode 2 the top R by AV;
* merge: the candidates in that order split into A = the first int(R / 2) and B = the rest; on the
  L2-normalised hidden states each B token's best A match (max cosine) is found; the min(|A|, M) B tokens
  with the highest match are merged into their A partner, ``A <- mean(A, merged B's)`` (``scatter_reduce_``
  "mean" including A itself); kept = A + the unmerged B, in sequence order, keeping their original RoPE
  positions (``keep_index_map``). Exactly K tokens survive for every K >= 2 with R <= N.

With N > D (tiny models) the reference's full-matrix SVD cannot form U S (U is N x N, S has D entries);
:func:`svd_contribution` uses the reduced SVD, the same numbers whenever N <= D (LLaVA: 576 <= 4096).

Registered as ``tokencarve`` through the in-LLM hook's merge output: at decoder layer ``layer`` (= the reference's
``work_layer``, 2) the hook keeps the K places of A + the unmerged B and gives each its merge weights over the N
alive image tokens (:func:`tokencarve_plan`), so an A token becomes the mean of itself and the B tokens merged into
it, with its original position (position policy "original", the reference's ``keep_index_map``). The reference runs
batch size 1; a batch here is planned image by image. What is here is exact and tested
(tests/test_compressors_seed.py) against a line-by-line re-statement of the reference.
"""
from __future__ import annotations

import torch

from ..errors import UserInputError
from ..models.base import InLLMContext
from .base import InLLMCompressor
from .registry import COMPRESSORS

MODES = {0: "tokencarve", 1: "sv", 2: "av"}


def counts(budget: int) -> tuple[int, int]:
    """(candidates R, merges M) of the reference for ``budget`` K: int(K / 2 * 3), int(K / 2)."""
    return int(budget / 2 * 3), int(budget / 2)


def svd_contribution(image_hidden: torch.Tensor) -> torch.Tensor:
    """(N,) L1 norm of each row of U S for the image hidden states (N, D), computed in float32."""
    u, s, _ = torch.linalg.svd(image_hidden.float(), full_matrices=False)
    return (u * s).abs().sum(dim=1)


def fused_points(av: torch.Tensor, sv: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """(N,) rank-fusion points: the i-th of each descending order gets N - i, weighted ``weight`` (AV)."""
    n = av.shape[0]
    points = torch.arange(n, 0, -1, device=av.device)
    out = torch.zeros(n, device=av.device)
    out[av.sort(descending=True).indices] += points * weight
    out[sv.sort(descending=True).indices] += points * (1 - weight)
    return out


def candidates(av: torch.Tensor, image_hidden: torch.Tensor, budget: int, mode: int = 0,
               weight: float = 0.5) -> torch.Tensor:
    """(R,) candidate image indices in the reference's (descending score) order."""
    r, _ = counts(budget)
    if mode == 0:
        return fused_points(av, svd_contribution(image_hidden), weight).topk(r).indices
    if mode == 1:
        return svd_contribution(image_hidden).topk(r).indices
    if mode == 2:
        return av.topk(r).indices
    raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(map(str, MODES))}")


def tokencarve_plan(av: torch.Tensor, image_hidden: torch.Tensor, budget: int, mode: int = 0,
                    weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept image indices (K,), ascending, and merge weights (K, N): kept token k's new hidden state is
    ``weights[k] @ image_hidden``. ``av`` (N,) is the last prompt token's head-mean attention of the previous
    layer, ``image_hidden`` (N, D) the image rows of that layer's output."""
    n = av.shape[0]
    r, m = counts(budget)
    if budget < 2 or r > n:
        raise ValueError(f"TokenCarve needs 2 <= K and int(1.5 K) <= N; got K={budget}, N={n}")
    cand = candidates(av, image_hidden, budget, mode, weight)
    metric = image_hidden / image_hidden.norm(dim=-1, keepdim=True)
    half = int(0.5 * r)
    a, b = cand[:half], cand[half:]
    best, partner = (metric[b] @ metric[a].t()).max(dim=-1)
    order = best.sort(descending=True).indices
    n_merge = min(half, m)
    merged, rest = order[:n_merge], order[n_merge:]
    weights = torch.zeros(n, n, device=av.device)
    weights[a, a] = 1.0
    weights[b[rest], b[rest]] = 1.0
    weights[a[partner[merged]], b[merged]] = 1.0
    kept = torch.cat([a, b[rest]]).sort().values
    w = weights[kept]
    return kept, w / w.sum(dim=-1, keepdim=True)


def max_budget(num_tokens: int) -> int:
    """The largest K with int(1.5 K) <= N (the reference's candidates must fit among the image tokens)."""
    k = num_tokens
    while k > 1 and counts(k)[0] > num_tokens:
        k -= 1
    return k


@COMPRESSORS.register()
class TokenCarve(InLLMCompressor):
    name = "tokencarve"
    fidelity = ("reference rule (ShawnTan86/TokenCarve@a57bd59): AV + SVD rank fusion, bipartite merge into A at "
                "work_layer 2; batch planned image by image; reduced SVD where N > D")
    paper = "TokenCarve, arXiv 2503.10501"
    text_aware = True
    position_policy = "original"
    native_knob = "token_carve_image_token_nums = budget (R = int(1.5 K) candidates, int(K / 2) merges)"

    def __init__(self, layer: int = 2, mode: int = 0, weight: float = 0.5):
        if mode not in MODES:
            raise UserInputError(f"unknown tokencarve mode {mode!r}; accepted: "
                                 + ", ".join(f"{k} ({v})" for k, v in MODES.items()))
        if not 0 <= weight <= 1:
            raise UserInputError(f"tokencarve weight must be in [0, 1], got {weight!r}")
        self.layer, self.mode, self.weight = int(layer), mode, float(weight)

    def check_budget(self, budget: int, num_tokens: int) -> int:
        budget = super().check_budget(budget, num_tokens)
        top = max_budget(num_tokens)
        if not 2 <= budget <= top:
            raise UserInputError(f"budget {budget} out of range for tokencarve: it ranks int(1.5 x budget) candidates "
                                 f"among the {num_tokens} visual tokens; accepted: 2..{top}")
        return budget

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        r, m = counts(budget)
        return {**super().budget_mapping(budget, num_tokens, num_layers), "candidates": r, "merges": m,
                "work_layer": self.layer, "mode": MODES[self.mode]}

    def select(self, ctx: InLLMContext, keep: int):
        d = ctx.hidden.shape[-1]
        av = ctx.attention_rows(ctx.text_index[:, -1:])[:, 0].gather(1, ctx.visual_index)  # (B, N) last token
        image = ctx.hidden.gather(1, ctx.visual_index.unsqueeze(-1).expand(-1, -1, d)).detach()
        kept, merge = zip(*(tokencarve_plan(av[b].detach().float(), image[b], keep, self.mode, self.weight)
                            for b in range(av.shape[0])))
        return torch.stack(kept), None, torch.stack(merge)
