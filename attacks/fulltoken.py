"""Full-token encoder baseline (VEAttack-style; Mei et al. 2026, as used by CAGE).

Maximises the mean over all N patches of 1 - cos(adv, clean) at the feature layer. It ignores the
compressor: the part of its damage that lands on tokens the compressor drops is wasted ("budget
dilution"), which is why it overestimates the robustness of compressed models.
"""
from __future__ import annotations

import torch

from robustvtc.models.base import VisualTokens

from .base import ATTACKS, EncoderAttack, ThreatModel


@ATTACKS.register()
class FullToken(EncoderAttack):
    """Grey-box sign-PGD (L∞) or normalised-gradient PGD (L2) on the mean cosine distortion of all tokens.

    Common options (see :data:`robustvtc.attacks.base.COMMON_DEFAULTS`): eps, norm, alpha, steps,
    random_start (default on: the loss has zero gradient at δ = 0), seed, eot_samples, quantize.
    """

    name = "fulltoken"
    role = "baseline"
    paper = "VEAttack (Mei et al. 2026), the full-token baseline of CAGE (arXiv 2601.21531)"
    threat = ThreatModel(gradients="encoder", compressor_known=False, budget_known=False, uses_question=False)

    def reduce(self, tokens: VisualTokens, distortion: torch.Tensor) -> torch.Tensor:
        return distortion.mean(dim=1)
