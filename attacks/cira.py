"""CIRA -- Compression-Induced Risk Attack (Li et al. 2026, "Still There, No Longer Seen", arXiv 2609.35002).

Encoder-only and budget-agnostic, like CAGE, but aimed the other way: the answer should fail *only* after
compression (a compression-specific failure, CSF), while the full-token answer stays right. No question, LLM,
compressor or exact budget is used; only an interval [K_min, K_max] of plausible budgets. Taken from the
paper (§4.2-4.4, Appendix A Algorithm 1, Appendix B.4), per sample, N visual tokens:

* priority score (eq. 13): s_i = mean over the scoring layers of the head-*summed* CLS->patch attention, layers
  (-1, -3, -5) relative to the encoder's last block. Clean s^c is computed once; adversarial s^a every step;
* clean rank r^c = rank_desc(s^c) (1 = highest priority) and its inverse-priority encoding
  R(s^c)_i = (r^c_i - 1) / (N - 1) (eq. 4);
* stabilised standardisation Z(u) = (u - mean u) / max(||u - mean u||_2 / sqrt(N), eps_s) (eq. 4);
* Global Selection Hijacking (eq. 5): L_GSH = (1/N) <Z(s^a), Z(R(s^c))> -- pushes the clean top tokens down
  and the clean bottom tokens up;
* Hidden-Evidence Preservation (eq. 6-8): r^a = rank_desc(s^a) (no gradient); a clean top-K token i is hidden at
  budget K when r^c_i <= K < r^a_i; its budget-marginal weight under K ~ U{K_min..K_max} is
  w_i = [min(K_max, r^a_i - 1) - max(K_min, r^c_i) + 1]_+ / (K_max - K_min + 1) (stop-gradient);
  d_i = (1 - cos(h^c_i, h^a_i)) / 2 (half-cosine drift); L_HEP = -Σ w_i d_i / max(Σ w_i, eps_h);
* maximise L_CIRA = L_GSH + λ L_HEP (eq. 9) by projected sign-gradient ascent from δ = 0 (Algorithm 1),
  ε = 4/255, step 1/255, 100 steps, λ = 0.8, [K_min, K_max] = [32, 192] of LLaVA-1.5's 576 tokens (B.4).

Adaptive CIRA against translation-consensus selection (eq. 12, Appendix F.3): when the target carries the
``translation_consensus`` defense, the objective is averaged over its views -- the unshifted image and each
shifted copy the defense scores -- each view with its own clean ranks and features, one shared δ.

What had to be chosen (the paper does not state it): eps_s and eps_h (1e-6 each here); which features HEP
compares -- the paper uses LLaVA's final CLIP layer after post-layernorm, here the feature layer the LLM reads
(the only patch features :class:`~robustvtc.models.base.VisualTokens` carries); scoring layers that the encoder
does not have (a 4-layer encoder has no layer -5) are left out; the budget interval is scaled to the model's
token count like CAGE's (144 tokens -> [8, 48]). No official code was found (searched 2026-10).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens
from robustvtc.target import Target

from .base import ATTACKS, EncoderAttack, ThreatModel, descending_rank

REFERENCE_TOKENS = 576
REFERENCE_K = (32, 192)  # Appendix B.4, "candidate budget range"
SCORE_LAYERS = (-1, -3, -5)  # Appendix B.4, eq. 13


def standardize(u: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Z_eps(u) = (u - mean) / max(||u - mean||_2 / sqrt(N), eps) along the last axis (eq. 4)."""
    centred = u - u.mean(dim=-1, keepdim=True)
    scale = (centred.square().mean(dim=-1, keepdim=True)).sqrt().clamp_min(eps)
    return centred / scale


def inverse_priority(clean_scores: torch.Tensor) -> torch.Tensor:
    """R(s^c)_i = (r^c_i - 1) / (N - 1): 0 for the clean top token, 1 for the last (eq. 4)."""
    n = clean_scores.shape[-1]
    return descending_rank(clean_scores, stable=True).float() / max(n - 1, 1)


def selection_hijacking(adv_scores: torch.Tensor, clean_scores: torch.Tensor, eps_s: float = 1e-6) -> torch.Tensor:
    """(B,) L_GSH = (1/N) <Z(s^a), Z(R(s^c))> (eq. 5)."""
    n = adv_scores.shape[-1]
    target = standardize(inverse_priority(clean_scores), eps_s)
    return (standardize(adv_scores.float(), eps_s) * target).sum(dim=-1) / n


def displacement_weights(clean_rank: torch.Tensor, adv_rank: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """w_i = Pr_{K ~ U{k_min..k_max}}[r^c_i <= K < r^a_i] in closed form (eq. 6); ranks start at 1."""
    upper = torch.clamp(adv_rank - 1, max=k_max)
    lower = torch.clamp(clean_rank, min=k_min)
    return (upper - lower + 1).clamp(min=0).float() / (k_max - k_min + 1)


def half_cosine_drift(adv_features: torch.Tensor, clean_features: torch.Tensor) -> torch.Tensor:
    """d_i = (1 - cos(h^c_i, h^a_i)) / 2 in [0, 1] (eq. 7)."""
    return (1 - torch.nn.functional.cosine_similarity(adv_features.float(), clean_features.float(), dim=-1)) / 2


def evidence_preservation(drift: torch.Tensor, weights: torch.Tensor, eps_h: float = 1e-6) -> torch.Tensor:
    """(B,) L_HEP = -Σ sg(w) d / max(Σ sg(w), eps_h) (eq. 8)."""
    w = weights.detach()
    return -(w * drift).sum(dim=-1) / w.sum(dim=-1).clamp_min(eps_h)


def cira_objective(adv_scores: torch.Tensor, clean_scores: torch.Tensor, adv_features: torch.Tensor,
                   clean_features: torch.Tensor, k_min: int, k_max: int, lam: float = 0.8, eps_s: float = 1e-6,
                   eps_h: float = 1e-6) -> torch.Tensor:
    """(B,) L_CIRA = L_GSH + λ L_HEP from (B, N) scores and (B, N, D) features (eq. 9)."""
    gsh = selection_hijacking(adv_scores, clean_scores, eps_s)
    if lam == 0:
        return gsh
    clean_rank, adv_rank = (descending_rank(s, stable=True) + 1 for s in (clean_scores, adv_scores))  # 1 = highest
    w = displacement_weights(clean_rank, adv_rank, k_min, k_max)
    return gsh + lam * evidence_preservation(half_cosine_drift(adv_features, clean_features), w, eps_h)


def priority_scores(tokens: VisualTokens, layers: Sequence[int]) -> torch.Tensor:
    """(B, N) eq. 13: the mean over ``layers`` of the head-summed CLS->patch attention."""
    return torch.stack([tokens.cls_attention(layer, reduce="sum").float() for layer in layers]).mean(dim=0)


@ATTACKS.register()
class CIRA(EncoderAttack):
    """Global selection hijacking + hidden-evidence preservation (grey-box, budget-agnostic, compression-triggered).

    Args:
        k_min, k_max: the admissible budget interval; None = the paper's [32, 192] of 576 tokens scaled to the
            model's token count.
        lam: λ, the weight of L_HEP (0.8, the paper's; 0 = GSH only, its "w/o Pres." ablation).
        layers: encoder layers of the priority score, relative or absolute (None = (-1, -3, -5), the ones the
            encoder has).
        eps_s, eps_h: the stabilisers of eq. 4 and eq. 8 (not stated in the paper; 1e-6).
        adaptive: "auto" = average the objective over the views of a ``translation_consensus`` defense on the
            target (Adaptive CIRA, eq. 12) when there is one; True requires one; False never.

    Defaults are the paper's: eps=4/255, alpha=1/255, steps=100, δ starting at zero (random_start=False).
    """

    name = "cira"
    role = "stealth"
    paper = "CIRA, arXiv 2609.35002 (Still There, No Longer Seen)"
    threat = ThreatModel(gradients="encoder", compressor_known=False, budget_known=False, uses_question=False)
    defaults = {"eps": "4/255", "alpha": "1/255", "steps": 100, "random_start": False}
    requires = frozenset({"cls_token"})  # the rank score is CLS attention summed over heads, averaged over layers

    def __init__(self, model, *, k_min: int | None = None, k_max: int | None = None, lam: float = 0.8,
                 layers: Sequence[int] | None = None, eps_s: float = 1e-6, eps_h: float = 1e-6,
                 adaptive: bool | str = "auto", **common):
        super().__init__(model, **common)
        n = self.adapter.num_visual_tokens
        self.k_min = max(1, round(REFERENCE_K[0] * n / REFERENCE_TOKENS)) if k_min is None else k_min
        self.k_max = min(n, round(REFERENCE_K[1] * n / REFERENCE_TOKENS)) if k_max is None else k_max
        if not (isinstance(self.k_min, int) and isinstance(self.k_max, int) and 1 <= self.k_min <= self.k_max <= n):
            raise UserInputError(f"cira needs integers 1 <= k_min <= k_max <= {n} (the model's token count), "
                                 f"got k_min={self.k_min!r}, k_max={self.k_max!r}")
        for what, value in (("lam", lam), ("eps_s", eps_s), ("eps_h", eps_h)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserInputError(f"cira: {what} must be a finite number >= 0, got {value!r}")
        self.lam, self.eps_s, self.eps_h = float(lam), float(eps_s), float(eps_h)
        depth = getattr(self.adapter, "num_vision_layers", None) or 0
        wanted = SCORE_LAYERS if layers is None else tuple(layers)
        if depth:
            resolved = [layer + depth if layer < 0 else layer for layer in wanted]
            kept = tuple(dict.fromkeys(layer for layer in resolved if 0 <= layer < depth))
        else:
            kept = tuple(wanted)
        if not kept:
            raise UserInputError(f"cira: none of the scoring layers {list(wanted)} exists in this {depth}-layer encoder")
        self.layers = kept
        if adaptive not in ("auto", True, False):
            raise UserInputError(f"cira: adaptive must be 'auto', true or false, got {adaptive!r}")
        self.adaptive = adaptive
        self._views = self._consensus_views()

    # ------------------------------------------------------------------ adaptive CIRA (eq. 12)
    def _consensus_views(self) -> list[tuple[int, int]] | None:
        """The pixel shifts of the target's translation-consensus views (with (0, 0) first), or None."""
        tcs = [d for d in getattr(self.target, "defenses", ()) if getattr(d, "name", "") == "translation_consensus"]
        if self.adaptive is False or not tcs:
            if self.adaptive is True:
                raise UserInputError("cira adaptive=true needs a target with the translation_consensus defense")
            return None
        from robustvtc.defenses.translation_consensus import CIRA_SHIFT, DIRECTIONS

        d = tcs[0]
        shift = d.shift or max(1, round(CIRA_SHIFT * self.adapter.input_size[0]))
        self._view_target = Target(self.adapter, self.target.compressor, self.target.budget,
                                   defenses=[x for x in self.target.defenses if x is not d])
        return [(0, 0), *((sy * shift, sx * shift) for sy, sx in DIRECTIONS[:d.views])]

    def _encode_views(self, pixels: torch.Tensor) -> list[VisualTokens]:
        from robustvtc.defenses.translation_consensus import shift_pixels

        return [self._view_target.encode(shift_pixels(pixels, dy, dx), self.layers, validate=False)
                for dy, dx in self._views]

    # ------------------------------------------------------------------ objective
    def signal_layers(self) -> tuple[int, ...]:
        return self.layers

    def prepare(self, clean, questions, answers, target_answers):
        views = self._encode_views(clean) if self._views else [self.encode(clean)]
        return [(priority_scores(t, self.layers), t.features.float()) for t in views]

    def objective(self, pixels: torch.Tensor, state) -> torch.Tensor:
        views = self._encode_views(pixels) if self._views else [self.encode(pixels)]
        values = [cira_objective(priority_scores(t, self.layers), s_c, t.features, h_c, self.k_min, self.k_max,
                                 self.lam, self.eps_s, self.eps_h) for t, (s_c, h_c) in zip(views, state)]
        return torch.stack(values).mean(dim=0)
