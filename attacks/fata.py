"""FATA -- Feature-Aware Token Attack (Yan et al. 2026, arXiv 2609.39134): compression-triggered stealthy failures.

Encoder-only (grey-box): no compressor, budget, LLM, question or answer. From the paper (§3.2 eq. 1-4,
Algorithm 1/2, Appendix A), per sample:

* s^c = the last encoder layer's CLS->patch attention of the clean image, averaged over heads; the target set
  M = TopK(s^c, M) with M = 64 (of LLaVA-1.5's 576 tokens) is fixed once, with the clean features h^c_i;
* L_attn = Σ_{i∈M} s^a_i  (eq. 2: the adversarial attention on the fixed targets, to be suppressed);
* L_sem = 1 - (1/|M|) Σ_{i∈M} cos(h^a_i, h^c_i)  (eq. 3: keep the targets' feature directions);
* L_FATA = L_attn + λ L_sem (eq. 4), *minimised* by ℓ∞ sign-PGD from a uniform random start
  (δ ← Π(δ - α sign ∇L_FATA)); λ = 1, ε = 2/255, α = 0.5/255, T = 100 steps.

robustvtc's loop maximises, so the objective here is -L_FATA (the same sign steps). What had to be chosen:
the features h -- the paper compares last-layer CLIP features (distinct from LLaVA's penultimate features), here
the feature-layer features the LLM reads (the only patch features :class:`~robustvtc.models.base.VisualTokens`
carries); M scales with the token count like CAGE's budgets (144 tokens -> 16). No official code was found.

The paper's metrics -- SR, CER and CBR at the practical budget K_prac -- are
:func:`robustvtc.campaign.metrics.fata_metrics`.
"""
from __future__ import annotations

import math

import torch

from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens

from .base import ATTACKS, EncoderAttack, ThreatModel

REFERENCE_TOKENS = 576
REFERENCE_M = 64  # eq. 1


def target_set(clean_attention: torch.Tensor, m: int) -> torch.Tensor:
    """(B, m) indices of the clean top-m tokens by attention (eq. 1)."""
    return clean_attention.detach().topk(m, dim=-1).indices


def attention_loss(adv_attention: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) L_attn = Σ_{i∈M} s^a_i (eq. 2)."""
    return adv_attention.float().gather(-1, targets).sum(dim=-1)


def semantic_loss(adv_features: torch.Tensor, clean_features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) L_sem = 1 - mean_{i∈M} cos(h^a_i, h^c_i) (eq. 3)."""
    index = targets.unsqueeze(-1).expand(-1, -1, adv_features.shape[-1])
    cos = torch.nn.functional.cosine_similarity(adv_features.float().gather(1, index),
                                                clean_features.float().gather(1, index), dim=-1)
    return 1 - cos.mean(dim=-1)


def fata_loss(adv_attention: torch.Tensor, adv_features: torch.Tensor, clean_features: torch.Tensor,
              targets: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """(B,) L_FATA = L_attn + λ L_sem (eq. 4), the value FATA minimises."""
    return attention_loss(adv_attention, targets) + lam * semantic_loss(adv_features, clean_features, targets)


@ATTACKS.register()
class FATA(EncoderAttack):
    """Attention suppression on the clean top-M tokens + cosine feature preservation on the same tokens.

    Args:
        m: size of the fixed target set; None = the paper's 64 of 576 scaled to the model's token count.
        lam: λ, the weight of L_sem (1, the paper's).
        layer: encoder layer of the attention (-1 = the last, the paper's).

    Defaults are the paper's: eps=2/255, alpha=0.5/255, steps=100, uniform random start.
    """

    name = "fata"
    role = "stealth"
    paper = "FATA, arXiv 2609.39134 (Feature-Aware Token Attack)"
    threat = ThreatModel(gradients="encoder", compressor_known=False, budget_known=False, uses_question=False)
    defaults = {"eps": "2/255", "alpha": "0.5/255", "steps": 100, "random_start": True}
    requires = frozenset({"cls_token"})  # eq. 1 ranks tokens by CLS attention

    def __init__(self, model, *, m: int | None = None, lam: float = 1.0, layer: int = -1, **common):
        super().__init__(model, **common)
        n = self.adapter.num_visual_tokens
        self.m = max(1, round(REFERENCE_M * n / REFERENCE_TOKENS)) if m is None else m
        if isinstance(self.m, bool) or not isinstance(self.m, int) or not 1 <= self.m <= n:
            raise UserInputError(f"fata: m must be an integer in 1..{n} (the model's token count), got {m!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise UserInputError(f"fata: lam must be a finite number >= 0, got {lam!r}")
        self.lam = float(lam)
        self.layer = layer

    def signal_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def prepare(self, clean, questions, answers, target_answers):
        tokens = self.encode(clean)
        return target_set(tokens.cls_attention(self.layer, reduce="mean"), self.m), tokens.features.float()

    def objective(self, pixels: torch.Tensor, state) -> torch.Tensor:
        targets, clean_features = state
        tokens: VisualTokens = self.encode(pixels)
        return -fata_loss(tokens.cls_attention(self.layer, reduce="mean"), tokens.features, clean_features, targets,
                          self.lam)
