"""White-box PGD on the answer loss, through the full-token model or through the compressed model.

The strongest attacker of the threat-model ladder: gradients of the whole LVLM, the compressor and the
budget known, the question used. Through the compressed model the top-K selection is piecewise constant,
so gradients either flow through the kept tokens' values with the selection held fixed for the step, or
through the compressor's differentiable relaxation (soft top-K / straight-through) where it offers one.
"""
from __future__ import annotations

from typing import Sequence

import torch

from robustvtc.errors import UserInputError

from .base import ATTACKS, Attack, ThreatModel, attack_target, check_choice, full_token_target


@ATTACKS.register()
class WhiteBox(Attack):
    """Untargeted: maximise the answer's negative log-likelihood. Targeted (``target_answers=`` at call
    time, or ``target_answer=`` as an option -- what a scenario or a pytest check sets): maximise the
    log-likelihood of the chosen answers.

    Args:
        target_answer: one answer every sample is pushed towards (e.g. "no"); None = untargeted unless
            ``target_answers`` are given at call time (those win).
        path: "compressed" = through the given target's compressor and budget; "full" = through the
            full-token model (the transfer baseline: the image is then evaluated on compressed targets).
        relaxation: "auto" (straight-through where the compressor offers it: exact forward, gradients to
            the importance scores), None (exact selection, gradients through the kept values only), or
            "straight_through" / "soft_topk" explicitly. The per-sample best iterate is chosen by the loss
            of the path the gradients are taken through (with "soft_topk", the relaxed model's loss).
    """

    name = "whitebox"
    role = "whitebox"
    paper = "PGD (Madry et al. 2018) on the LVLM answer loss"
    threat = ThreatModel(gradients="model", compressor_known=True, budget_known=True, uses_question=True)

    def __init__(self, model, *, path: str = "compressed", relaxation: str | None = "auto",
                 target_answer: str | None = None, **common):
        super().__init__(model, **common)
        self.target_answer = _target_answer(target_answer, self.name)
        self.path = check_choice(path, ("compressed", "full"), "path")
        self.relaxation = relaxation
        if path == "compressed":
            self.gradient_target = attack_target(self.target, relaxation)
        else:
            self.gradient_target = full_token_target(self.target)

    def prepare(self, clean, questions: Sequence[str] | None, answers: Sequence[str] | None,
                target_answers: Sequence[str] | None):
        if target_answers is None and self.target_answer is not None:
            target_answers = [self.target_answer] * clean.shape[0]
        if target_answers is not None:
            return list(questions), list(target_answers), -1.0
        if answers is None:
            raise UserInputError("whitebox needs answers (untargeted) or target_answers (targeted)")
        return list(questions), list(answers), 1.0

    def objective(self, pixels: torch.Tensor, state) -> torch.Tensor:
        questions, answers, sign = state
        return sign * self.gradient_target.answer_loss(pixels, questions, answers)


def _target_answer(value, attack: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise UserInputError(f"{attack}: target_answer must be a non-empty answer string or null, got {value!r}")
    return value
