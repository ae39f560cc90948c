"""CAGE -- Compression-AliGnEd attack (Zhang et al., ICML 2026, arXiv 2601.21531).

Grey-box and budget-agnostic: it uses only the vision encoder (no compressor, no budget, no text) and
aligns the full-token optimisation with what a top-K compressor will keep. The objective follows the
authors' released code (XinweiZhang1998/CAGE, ``attacker_TextVQA_caa.py``, functions
``get_survival_probs``, ``expected_feature_divergence``, ``rda_kl_align``), per sample:

* d_i = 1 - cos(z_i(x+δ), z_i(x)) at the feature layer (``--sel_layer -2``: LLaVA's penultimate layer);
* s_i = head-mean CLS->patch attention (``--score_method attn``, the default; ``out.attentions[-2]``, i.e.
  the attention of the same penultimate layer). VisionZip sums heads, which ranks identically;
* r_i = rank of s_i in descending order (0 = most important), recomputed every step, detached;
* π_i = clamp((K_max - r_i) / (K_max - K_min + 1e-6), 0, 1) = P(K > r_i) for a budget K ~ U[K_min, K_max]
  (argparse defaults ``--k_min 16 --k_max 192`` of LLaVA's 576 tokens): the expectation over unknown
  budgets in closed form, no sampled budgets;
* L_EFD = Σ π_i d_i / (Σ π_i + 1e-6)  (expected feature disruption of the tokens likely to survive);
* L_RDA = (Σ softmax(z(d.detach()))_i · log_softmax(z(s))_i + log N) / log N (rank distortion alignment:
  pull the importance distribution towards the damage distribution, so damaged tokens rise in rank and
  survive selection; the affine rescale maps [-log N, 0] to [0, 1]). z() is the z-score the official code
  computes in float32 with the population standard deviation, ``(x - x.mean()) / x.std(unbiased=False)``,
  no epsilon; see :func:`zscore` for the one guard added here;
* maximise ``lambda_efd · L_EFD + lambda_rda · L_RDA`` with sign-PGD from δ = 0
  (the code's ``loss = args.lambda_div * L_div + args.lambda_attr * L_align``).

The official README (step 3) runs ``--epsilon 2 --alpha 0.5 --steps 100 --sel_layer -2 --lambda_div 0.005``
and leaves ``--lambda_attr`` at its argparse default 1.0: the defaults here are that command.
"""
from __future__ import annotations

import math

import torch

from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens

from .base import (ATTACKS, IMPORTANCE_SCORES, SCORE_REQUIRES, EncoderAttack, ThreatModel, check_choice,
                   descending_rank, importance)

REFERENCE_TOKENS = 576  # LLaVA-1.5's 24x24 grid, the scale of the reference budget interval [16, 192]
REFERENCE_K = (16, 192)  # the official argparse defaults --k_min 16 --k_max 192


def survival_probability(rank: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """π = P(K > rank) for K ~ U[k_min, k_max]: 1 up to rank k_min, linear to 0 at rank k_max.

    The official ``get_survival_probs`` divides by ``k_max - k_min + 1e-6``; the same expression here."""
    return ((k_max - rank.float()) / (k_max - k_min + 1e-6)).clamp(0, 1)


def zscore(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` along the last axis in float32, with the population std (``unbiased=False``) and
    no epsilon, as the official ``rda_kl_align`` computes it.

    Guard: where the std is exactly 0 (a constant vector -- e.g. a distortion that is exactly 0 on every
    token) the official code divides 0 by 0 and its loss, gradient and sign step become NaN. Here such a
    std is replaced by 1, so the z-score is 0 everywhere (a uniform softmax). Every input whose std is
    not 0 goes through the official formula unchanged, bit for bit.
    """
    x = x.float()
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    std = torch.where(std == 0, torch.ones_like(std), std)
    return (x - x.mean(dim=-1, keepdim=True)) / std


def rank_distortion_alignment(distortion: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B,) L_RDA: Σ softmax(z(d.detach())) · log_softmax(z(s)), rescaled by (raw + log N) / log N as in the
    official code (log N replaced by 1 when N = 1); 0 for a uniform importance distribution."""
    n = scores.shape[-1]
    target = zscore(distortion.detach()).softmax(dim=-1)
    raw = (target * zscore(scores).log_softmax(dim=-1)).sum(dim=-1)
    denom = math.log(n) if n > 1 else 1.0
    return (raw + denom) / denom


def expected_feature_disruption(distortion: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """(B,) L_EFD = Σ π d / (Σ π + 1e-6), the official ``expected_feature_divergence``."""
    return (distortion * pi).sum(dim=-1) / (pi.sum(dim=-1) + 1e-6)


def cage_objective(distortion: torch.Tensor, scores: torch.Tensor, k_min: int, k_max: int,
                   lambda_efd: float = 0.005, lambda_rda: float = 1.0) -> torch.Tensor:
    """(B,) ``lambda_efd · L_EFD + lambda_rda · L_RDA`` from the (B, N) distortion and importance scores."""
    pi = survival_probability(descending_rank(scores), k_min, k_max)
    efd = expected_feature_disruption(distortion, pi)
    if lambda_rda == 0:
        return lambda_efd * efd
    return lambda_efd * efd + lambda_rda * rank_distortion_alignment(distortion, scores)


@ATTACKS.register()
class CAGE(EncoderAttack):
    """Expected feature disruption + rank distortion alignment (grey-box, budget-agnostic).

    Defaults are the official README command (``--epsilon 2 --alpha 0.5 --steps 100 --sel_layer -2
    --lambda_div 0.005``, ``--lambda_attr`` left at 1.0, δ starting at zero): eps=2/255, alpha=0.5/255
    (an absolute step, as the README's ``--alpha``; pass ``alpha=None`` for eps/4), steps=100,
    random_start=False, lambda_efd=0.005, lambda_rda=1.0.

    Args:
        k_min, k_max: the budget interval the expectation runs over. None = the official [16, 192] of 576
            tokens scaled to the model's token count (the built-in model's 144 tokens -> [4, 48]).
        lambda_efd: weight of L_EFD (the official ``--lambda_div``); 0.005 as in the README command.
        lambda_rda: weight of L_RDA (the official ``--lambda_attr``); 1.0, its default, which the README
            command does not change. The paper writes the objective as L_EFD + λ·L_RDA: pass
            ``lambda_efd=1, lambda_rda=λ`` for that form. With sign steps only the ratio of the two weights
            matters (a positive factor on the objective does not change sign(∇)), so the README's 0.005 : 1
            is the paper form with λ = 200.
        layer: encoder layer of the importance score; None = the feature layer (official: ``attentions[-2]``
            with ``sel_layer=-2``, the same layer).
        score: "attention" (official default) or "norm" (feature L2 norm, the official alternative), or
            "received" (encoders without CLS: the attention each token receives at the last vision layer,
            VisionZip's score in its official Qwen2.5-VL port -- what ``visionzip_qwen`` keeps by).

    Common options as in :data:`robustvtc.attacks.base.COMMON_DEFAULTS`, with the defaults above.
    """

    name = "cage"
    role = "compression_aligned"
    paper = "CAGE, arXiv 2601.21531 (ICML 2026)"
    threat = ThreatModel(gradients="encoder", compressor_known=False, budget_known=False, uses_question=False)
    defaults = {"eps": "2/255", "alpha": "0.5/255", "steps": 100, "random_start": False}

    def __init__(self, model, *, k_min: int | None = None, k_max: int | None = None, lambda_efd: float = 0.005,
                 lambda_rda: float = 1.0, layer: int | None = None, score: str = "attention", **common):
        super().__init__(model, **common)
        n = self.adapter.num_visual_tokens
        self.k_min = max(1, round(REFERENCE_K[0] * n / REFERENCE_TOKENS)) if k_min is None else k_min
        self.k_max = min(n, round(REFERENCE_K[1] * n / REFERENCE_TOKENS)) if k_max is None else k_max
        if not (isinstance(self.k_min, int) and isinstance(self.k_max, int) and 0 <= self.k_min < self.k_max <= n):
            raise UserInputError(f"cage needs integers 0 <= k_min < k_max <= {n} (the model's token count), "
                                 f"got k_min={self.k_min!r}, k_max={self.k_max!r}")
        for what, value in (("lambda_efd", lambda_efd), ("lambda_rda", lambda_rda)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise UserInputError(f"cage: {what} must be a finite number >= 0, got {value!r}")
        if lambda_efd == 0 and lambda_rda == 0:
            raise UserInputError("cage: lambda_efd and lambda_rda are both 0, nothing to maximise; "
                                 "accepted: at least one weight > 0")
        self.lambda_efd = float(lambda_efd)
        self.lambda_rda = float(lambda_rda)
        self.layer = layer
        self.score = check_choice(score, IMPORTANCE_SCORES, "importance score")
        self._require(SCORE_REQUIRES[self.score], f" with score={self.score!r}")

    def signal_layers(self) -> tuple[int, ...]:
        return () if self.layer is None else (self.layer,)

    def reduce(self, tokens: VisualTokens, distortion: torch.Tensor) -> torch.Tensor:
        scores = importance(tokens, self.score, self.layer)
        return cage_objective(distortion, scores, self.k_min, self.k_max, self.lambda_efd, self.lambda_rda)
