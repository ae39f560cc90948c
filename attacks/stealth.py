"""Stealth attack in the spirit of CAA (Zhang et al. 2026, arXiv 2601.12042): failures only under compression.

CAA's idea (no code was published): maximise the deviation of the compressed model's output while
penalising the deviation of the uncompressed model's, so the image looks harmless to full-token testing
and the failure appears only once compression is switched on. Both paths share one encoder pass.
"""
from __future__ import annotations

from typing import Sequence

import torch

from robustvtc.errors import UserInputError
from robustvtc.target import Forward

from .base import ATTACKS, Attack, ThreatModel, attack_target, check_choice, full_token_target


@ATTACKS.register()
class Stealth(Attack):
    """Maximise  deviation(compressed path) - mu * deviation(full-token path).

    Args:
        loss: "nll" -- compressed answer NLL minus mu * the rise of the full-token NLL over its clean value
            (a hinge: the full path is not pushed to be more confident than it was); needs the answers.
            "kl" -- KL(clean || adversarial) of the next-token distribution at the answer position, per path,
            each against its own clean output; label-free.
        mu: weight of the full-token penalty.
        relaxation: as in :class:`~robustvtc.attacks.whitebox.WhiteBox`, for the compressed path.
        target_answer: targeted stealth (loss "nll" only): the compressed path is pushed towards this answer
            (its log-likelihood is maximised) while the full-token path keeps the true answer (the same hinge
            on its NLL). ``target_answers=`` at call time does the same per sample and wins.
    """

    name = "stealth"
    role = "stealth"
    paper = "CAA, arXiv 2601.12042 (objective in its spirit; no reference code)"
    threat = ThreatModel(gradients="model", compressor_known=True, budget_known=True, uses_question=True)

    def __init__(self, model, *, loss: str = "nll", mu: float = 1.0, relaxation: str | None = "auto",
                 target_answer: str | None = None, **common):
        super().__init__(model, **common)
        from .whitebox import _target_answer

        self.target_answer = _target_answer(target_answer, self.name)
        if self.target.budget == self.adapter.num_visual_tokens:
            raise UserInputError("stealth needs a compressed target (a compressor and a budget below the token count)")
        self.loss = check_choice(loss, ("nll", "kl"), "stealth loss")
        self.mu = float(mu)
        self.relaxation = relaxation
        self.gradient_target = attack_target(self.target, relaxation)
        self._full = full_token_target(self.target)

    def _paths(self, pixels: torch.Tensor) -> tuple[Forward, Forward]:
        tokens = self.gradient_target.encode(pixels)
        return self.gradient_target.forward(pixels, tokens), self._full.forward(pixels, tokens)

    def _next_token_logprobs(self, fwd: Forward, questions: Sequence[str]) -> torch.Tensor:
        hidden, _ = self.adapter.hidden_states(fwd.embeds, questions, in_llm=fwd.in_llm)
        last = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1, device=hidden.device)
        return self.adapter.logits_at(hidden, last)[:, 0].log_softmax(dim=-1)

    def _deviations(self, fwds: tuple[Forward, Forward], questions, answers) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loss == "nll":
            return tuple(self.adapter.answer_loss(f.embeds, questions, answers, in_llm=f.in_llm) for f in fwds)
        return tuple(self._next_token_logprobs(f, questions) for f in fwds)

    def prepare(self, clean, questions, answers, target_answers):
        if self.loss == "nll" and answers is None:
            raise UserInputError("stealth with loss='nll' needs the answers; use loss='kl' without labels")
        if target_answers is None and self.target_answer is not None:
            target_answers = [self.target_answer] * clean.shape[0]
        if target_answers is not None and self.loss != "nll":
            raise UserInputError("targeted stealth needs loss='nll'")
        answers = None if answers is None else list(answers)
        targets = None if target_answers is None else list(target_answers)
        return list(questions), answers, targets, self._deviations(self._paths(clean), questions, answers)

    def objective(self, pixels: torch.Tensor, state) -> torch.Tensor:
        questions, answers, targets, (clean_c, clean_f) = state
        if targets is not None:  # compressed path towards the target, full-token path kept on the true answer
            compressed, full = self._paths(pixels)
            toward = -self.adapter.answer_loss(compressed.embeds, questions, targets, in_llm=compressed.in_llm)
            adv_f = self.adapter.answer_loss(full.embeds, questions, answers, in_llm=full.in_llm)
            return toward - self.mu * (adv_f - clean_f).clamp(min=0)
        adv_c, adv_f = self._deviations(self._paths(pixels), questions, answers)
        if self.loss == "nll":
            return adv_c - self.mu * (adv_f - clean_f).clamp(min=0)
        return _kl(clean_c, adv_c) - self.mu * _kl(clean_f, adv_f)


def _kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || p) per row from log-probabilities."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
