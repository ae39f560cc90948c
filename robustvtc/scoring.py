"""Answer metrics for short-answer VQA and multiple choice.

Short answers: the VQA benchmark's answer normalisation (Antol et al. 2015, the official evaluation script's
rules, re-implemented here), normalised exact match, and VQA soft accuracy ``min(#humans who gave the
answer / 3, 1)``. Multiple choice: a log-probability per option, scored by the option's letter after an
A/B/C... prompt (LLaVA's MMBench protocol) or by the option's text.
"""
from __future__ import annotations

import itertools
import re
import string
from typing import TYPE_CHECKING, Sequence

import torch

from .errors import UserInputError

if TYPE_CHECKING:
    from .target import Target

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ";/[]\"{}()=+\\_->@`,?!<"  # what the VQA script strips or spaces; periods are handled apart
# Contractions as the VQA script restores them; each also matches with any of its apostrophes dropped.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll something's that's there'd there'd've there're there's they'd "
    "they'd've they'll they're they've 'twas wasn't we'd we'd've we're we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_map() -> dict[str, str]:
    out = {}
    for word in _CONTRACTIONS:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for k in range(1, len(cuts) + 1):
            for drop in itertools.combinations(cuts, k):
                out["".join(ch for i, ch in enumerate(word) if i not in drop)] = word
    return out


_CONTRACTION_OF = _contraction_map()
_DIGIT_COMMA_DIGIT = re.compile(r"(\d),(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # the script's period rule: a period not followed by a digit goes


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation: whitespace, punctuation, periods, lower case, number words
    to digits, articles dropped, contractions restored ("dont" -> "don't")."""
    original = text = text.replace("\n", " ").replace("\t", " ").strip()
    has_number_comma = bool(_DIGIT_COMMA_DIGIT.search(original))
    for p in _PUNCTUATION:
        # spaced punctuation, or any in a text with a 1,000-style number, is removed; otherwise it separates
        spaced = p + " " in original or " " + p in original
        text = text.replace(p, "" if spaced or has_number_comma else " ")
    text = _PERIOD.sub("", text)
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTION_OF.get(w, w))
    return " ".join(words)


def _check_answers(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str) or not answers:
        raise UserInputError(f"answers must be a non-empty list of strings, got {answers!r}")
    return [normalize_answer(a) for a in answers]


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference answer, else 0.0."""
    return float(normalize_answer(prediction) in _check_answers(answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy ``min(#references equal to the prediction / 3, 1)`` after normalisation.

    ``answers`` are all human answers, repeats included (VQA v2 has 10 per question). The official script
    further averages this over the 10 leave-one-out subsets of 9 annotators; this is the undivided form."""
    pred = normalize_answer(prediction)
    return min(sum(a == pred for a in _check_answers(answers)) / 3.0, 1.0)


def option_letters(n: int) -> list[str]:
    if not 2 <= n <= 26:
        raise UserInputError(f"a multiple-choice item needs 2..26 options, got {n}")
    return list(string.ascii_uppercase[:n])


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    """The question with lettered options and LLaVA's instruction to answer with the letter."""
    lines = [question, *(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options))]
    return "\n".join(lines) + "\nAnswer with the option's letter from the given choices directly."


@torch.no_grad()
def letter_logprobs(target: "Target", pixels: torch.Tensor, prompts: Sequence[str], widths: Sequence[int],
                    tokens=None) -> torch.Tensor:
    """(B, max width) log-probability of each option letter after lettered prompts (LLaVA's MMBench protocol),
    one batched forward; -inf past an item's last option."""
    letters = option_letters(max(widths))
    scores = target.candidate_logprobs(pixels, list(prompts), letters, tokens=tokens).float().cpu()
    for b, width in enumerate(widths):
        scores[b, width:] = float("-inf")
    return scores


@torch.no_grad()
def option_logprobs(target: "Target", pixels: torch.Tensor, questions: Sequence[str],
                    options: Sequence[Sequence[str]], by: str = "letter") -> torch.Tensor:
    """(B, max options) log-probability of every option of every item; -inf past an item's last option.

    ``by="letter"``: the prompt lists the options and each option is scored by its letter;
    ``by="text"``: the bare question, each option scored by its (teacher-forced) text."""
    if by not in ("letter", "text"):
        raise UserInputError(f"unknown option scoring {by!r}; accepted: letter, text")
    if not len(questions) == len(options) == pixels.shape[0]:
        raise UserInputError(f"{pixels.shape[0]} images, {len(questions)} questions and {len(options)} option lists")
    if by == "letter":
        prompts = [multiple_choice_prompt(q, opts) for q, opts in zip(questions, options)]
        return letter_logprobs(target, pixels, prompts, [len(o) for o in options])
    width = max(len(o) for o in options)
    out = torch.full((len(questions), width), float("-inf"))
    for b, (question, opts) in enumerate(zip(questions, options)):
        out[b, :len(opts)] = target.candidate_logprobs(pixels[b:b + 1], [question], list(opts))[0].float().cpu()
    return out
