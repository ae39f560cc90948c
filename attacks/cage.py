"""CAGE -- Compression-AliGnEd attack (Zhang et al., ICML 2026, arXiv 2601.21531).

Grey-box and budget-agnostic: it uses only the vision encoder (no compressor, no budget, no text) and
aligns the full-token optimisation with what a top-K compressor will keep. Objective, per sample, as in
the authors' released code (XinweiZhang1998/CAGE, ``attacker_TextVQA_caa.py``):

* d_i = 1 - cos(z_i(x+δ), z_i(x)) at the feature layer (LLaVA: penultimate, ``sel_layer=-2``);
* s_i = head-mean CLS->patch attention of the configured layer (default the feature layer = the
  reference's ``attentions[-2]``; VisionZip sums heads, which ranks identically);
* r_i = rank of s_i in descending order, recomputed every step and detached;
* π_i = clip((K_max - r_i) / (K_max - K_min), 0, 1) = P(K > r_i) for a budget K ~ U[K_min, K_max]:
  the expectation over unknown budgets in closed form, no sampled budgets;
* L_EFD = Σ π_i d_i / (Σ π_i + 1e-6)  (expected feature disruption of the tokens that survive);
* L_RDA = (Σ softmax(z(d).detach())_i · log_softmax(z(s))_i + log N) / log N, with z() the z-score
  (rank distortion alignment: pull the importance distribution towards the damage distribution so that
  damaged tokens rise in rank and survive selection; the affine rescale only changes the scale);
* maximise L_EFD + λ · L_RDA with sign-PGD.
"""
from __future__ import annotations

import math

import torch

from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens

from .base import ATTACKS, EncoderAttack, IMPORTANCE_SCORES, ThreatModel, check_choice, descending_rank, importance

REFERENCE_TOKENS = 576  # LLaVA-1.5's 24x24 grid, the scale of the reference budget interval [16, 192]
REFERENCE_K = (16, 192)


def survival_probability(rank: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """π = P(K > rank) for K ~ U[k_min, k_max]: 1 up to rank k_min, linear to 0 at rank k_max."""
    return ((k_max - rank.float()) / (k_max - k_min)).clamp(0, 1)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True, unbiased=False) + 1e-6)


def rank_distortion_alignment(distortion: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B,) cross-entropy alignment of softmax(z(scores)) to the detached softmax(z(distortion)), rescaled
    by (raw + log N) / log N as in the reference code (0 for a uniform importance distribution)."""
    n = scores.shape[-1]
    target = _zscore(distortion.detach()).softmax(dim=-1)
    raw = (target * _zscore(scores).log_softmax(dim=-1)).sum(dim=-1)
    return (raw + math.log(n)) / math.log(n)


@ATTACKS.register()
class CAGE(EncoderAttack):
    """Expected feature disruption + rank distortion alignment (grey-box, budget-agnostic).

    Args:
        k_min, k_max: the budget interval the expectation runs over. None = the reference [16, 192] of 576
            tokens scaled to the model's token count (the built-in model's 144 tokens -> [4, 48]).
        lambda_rda: λ, weight of L_RDA. 0.005 follows the reference README (``--lambda_attr 0.005`` with
            the EFD weight at 1); with sign steps only the ratio of the two weights matters.
        layer: encoder layer of the importance score; None = the feature layer (reference: ``attentions[-2]``).
        score: "attention" (reference default) or "norm" (feature L2 norm, the reference's alternative).

    Common options as in :data:`robustvtc.attacks.base.COMMON_DEFAULTS`, with the reference's defaults
    steps=100 and random_start=False (zero initial δ); alpha defaults to eps/4, the reference command's
    ratio (eps 2/255, alpha 0.5/255).
    """

    name = "cage"
    paper = "CAGE, arXiv 2601.21531 (ICML 2026)"
    threat = ThreatModel(gradients="encoder", compressor_known=False, budget_known=False, uses_question=False)
    defaults = {"steps": 100, "random_start": False}

    def __init__(self, model, *, k_min: int | None = None, k_max: int | None = None, lambda_rda: float = 0.005,
                 layer: int | None = None, score: str = "attention", **common):
        super().__init__(model, **common)
        n = self.adapter.num_visual_tokens
        self.k_min = max(1, round(REFERENCE_K[0] * n / REFERENCE_TOKENS)) if k_min is None else k_min
        self.k_max = min(n, round(REFERENCE_K[1] * n / REFERENCE_TOKENS)) if k_max is None else k_max
        if not (isinstance(self.k_min, int) and isinstance(self.k_max, int) and 0 <= self.k_min < self.k_max <= n):
            raise UserInputError(f"cage needs integers 0 <= k_min < k_max <= {n} (the model's token count), "
                                 f"got k_min={self.k_min!r}, k_max={self.k_max!r}")
        self.lambda_rda = float(lambda_rda)
        self.layer = layer
        self.score = check_choice(score, IMPORTANCE_SCORES, "importance score")

    def signal_layers(self) -> tuple[int, ...]:
        return () if self.layer is None else (self.layer,)

    def reduce(self, tokens: VisualTokens, distortion: torch.Tensor) -> torch.Tensor:
        scores = importance(tokens, self.score, self.layer)
        pi = survival_probability(descending_rank(scores), self.k_min, self.k_max)
        efd = (pi * distortion).sum(dim=-1) / (pi.sum(dim=-1) + 1e-6)
        if self.lambda_rda == 0:
            return efd
        return efd + self.lambda_rda * rank_distortion_alignment(distortion, scores)
