"""torchattacks bridge: a target + per-sample questions + candidate answers as a classifier over the answers.

``CandidateLogits`` maps pixels in [0, 1] to (B, C) summed log-probabilities of the C candidate answers --
genuine multi-class logits, so torchattacks' PGD, MIFGSM, APGD (CE or DLR, C >= 3) run unchanged, and
"success" means the predicted answer changed. Two torchattacks traps are handled here:

* APGD's ``forward`` returns the *clean* image for every sample it did not flip; an image meant to be
  transferred to other compressors or budgets must instead be the best-loss iterate:
  :func:`run_torchattack` uses APGD's best-loss path and warns for the other attacks that do this.
* MultiAttack, AutoAttack and APGD call the model on *subsets* of the batch (the still-correct samples),
  but the model gets only pixels. The bridge then finds each row's question by matching it to the nearest
  clean image, which is unambiguous while the row lies closer to its clean image than half the distance to
  any clean image carrying another question; otherwise it raises a clear error instead of pairing images
  with the wrong questions.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from robustvtc.errors import UserInputError
from robustvtc.target import Target

# torchattacks attacks whose result is the clean image wherever they failed.
RETURNS_CLEAN_ON_FAILURE = ("APGDT", "CW", "FAB", "Square", "MultiAttack", "AutoAttack")


class CandidateLogits(torch.nn.Module):
    """pixels (b, 3, H, W) in [0, 1] -> (b, C) candidate-answer log-probabilities under ``target``.

    ``clean`` and ``questions`` describe the batch the attack will be run on (row i of any full-size call
    is sample i); ``candidates`` are the answer options, shared by all samples.
    """

    def __init__(self, target, clean: torch.Tensor, questions: Sequence[str], candidates: Sequence[str]):
        super().__init__()
        self.target = target if isinstance(target, Target) else Target(target)
        self.backbone = self.target.adapter.model  # a submodule, so torchattacks finds the device and sets eval()
        clean = self.target.adapter.check_pixels(clean).detach()
        if clean.shape[0] != len(questions):
            raise UserInputError(f"{clean.shape[0]} images but {len(questions)} questions")
        if len(candidates) < 2:
            raise UserInputError("the bridge needs at least 2 candidate answers")
        self.register_buffer("clean", clean, persistent=False)
        self.questions = list(questions)
        self.candidates = list(candidates)
        flat = clean.flatten(1).float()
        dist = torch.cdist(flat, flat, p=float("inf"))
        other = torch.tensor([[qi != qj for qj in self.questions] for qi in self.questions], device=dist.device)
        # distance from each clean image to the nearest clean image that carries a different question
        self.register_buffer("separation", dist.masked_fill(~other, float("inf")).amin(dim=1), persistent=False)

    def labels(self, answers: Sequence[str]) -> torch.Tensor:
        """Class indices of ``answers`` among the candidates (torchattacks' ``labels``)."""
        unknown = sorted({a for a in answers if a not in self.candidates})
        if unknown:
            raise UserInputError(f"answers not among the candidates: {', '.join(unknown)}")
        return torch.tensor([self.candidates.index(a) for a in answers], device=self.clean.device)

    def questions_for(self, pixels: torch.Tensor) -> list[str]:
        """The question of every row: by position for a full batch, else by the nearest clean image."""
        if pixels.shape[0] == len(self.questions):
            return self.questions
        if len(set(self.questions)) == 1:
            return self.questions[:1] * pixels.shape[0]
        dist = torch.cdist(pixels.detach().flatten(1).float(), self.clean.flatten(1).float(), p=float("inf"))
        nearest, index = dist.min(dim=1)
        unsure = nearest >= self.separation[index] / 2
        if bool(unsure.any()):
            row = int(unsure.nonzero()[0])
            raise UserInputError(
                f"the model was called on {pixels.shape[0]} of {len(self.questions)} images (MultiAttack, "
                f"AutoAttack and APGD attack subsets) and row {row} cannot be matched to one question: its clean "
                "image is too close to an image with another question; run one question per batch or use PGD")
        return [self.questions[i] for i in index.tolist()]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.target.candidate_logprobs(pixels, self.questions_for(pixels), self.candidates)


def run_torchattack(attack, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Run a torchattacks attack so that every sample gets a perturbed image, where torchattacks allows it.

    APGD runs its best-loss path (``perturb(..., best_loss=True)``, seeded like its default path): the
    highest-loss iterate per sample instead of the clean image for unflipped samples. For attacks that
    return the clean image on failure and have no such path, a warning says so. The images are handed over
    contiguous (a permuted batch, e.g. from ``numpy -> permute``, crashes FAB's ``view``).
    """
    kind = type(attack).__name__
    images = images.contiguous()  # FAB views its input (fab.py: .view on a permuted batch fails otherwise)
    if kind == "APGD":
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(attack.seed)
            return attack.perturb(images, labels, best_loss=True)[1]
    if kind in RETURNS_CLEAN_ON_FAILURE:
        warnings.warn(f"torchattacks {kind} returns the clean image for samples it does not flip; do not "
                      "transfer its images to other compressors or budgets", stacklevel=2)
    return attack(images, labels)
