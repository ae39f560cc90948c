"""Benchmark presets for Hugging Face datasets on disk: column mapping, the prompt suffix lmms-eval uses, and
each benchmark's official metric (per record, then aggregated).

| preset | columns (the lmms-lab release) | per-record score | aggregate |
|---|---|---|---|
| textvqa | question, answers (10 strings), image, question_id | VQA accuracy | mean |
| vqav2 | question, answers (10 {"answer": ...}), image, question_id | VQA accuracy | mean |
| gqa | question, answer, image (or imageId + images folder), id | exact match | mean |
| pope | question, answer (yes/no), image, question_id, category | yes/no correct | accuracy, F1, yes-ratio |
| mme | question, answer (Yes/No), image, question_id, category | yes/no correct | perception / cognition score |

VQA accuracy is the official evaluation's: answers normalised (:func:`robustvtc.scoring.normalize_answer`),
then ``min(1, matches / 3)`` averaged over the 10 leave-one-out subsets of 9 annotators. GQA: exact match after
lower-casing and stripping punctuation and spaces (lmms-eval's ``exact_match`` with ignore_case and
ignore_punctuation). POPE: the POPE/LLaVA script's reading (first sentence, commas removed, "no"/"No"/"not" as a
word -> no, else yes); yes-ratio is the share of "yes" predictions, as that script computes it (lmms-eval's
aggregate counts the references instead). MME: the Otter/lmms-eval reading (exact yes/no, a single y/n, else
"yes" or "no" in the first 4 characters, else other); per category, the mean over images of accuracy + accuracy+
(both questions of the image right), in percent; perception and cognition sum their categories.
"""
from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

from ..scoring import exact_match, vqa_accuracy as soft_accuracy

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy: :func:`robustvtc.scoring.vqa_accuracy`, min(1, matches / 3), averaged over the
    leave-one-out annotator subsets; exact match for a single reference."""
    answers = list(answers)
    if len(answers) == 1:
        return exact_match(prediction, answers)
    return sum(soft_accuracy(prediction, answers[:i] + answers[i + 1:]) for i in range(len(answers))) / len(answers)


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def gqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    def norm(text: str) -> str:
        return _PUNCT.sub("", text.lower()).strip()
    return float(norm(prediction) in {norm(a) for a in answers})


def pope_label(prediction: str) -> str:
    """yes / no as the POPE script reads an answer."""
    text = prediction
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def mme_label(prediction: str) -> str:
    """yes / no / other as MME's evaluation (Otter, lmms-eval) reads an answer."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _yes_no_score(label: Callable[[str], str]):
    def score(prediction: str, answers: Sequence[str]) -> float:
        return float(label(prediction) == answers[0].lower().strip().replace(".", ""))
    return score


def mean_score(records: Sequence[dict]) -> dict:
    return {"score": sum(r["score"] for r in records) / len(records)} if records else {"score": float("nan")}


def pope_aggregate(records: Sequence[dict]) -> dict:
    """accuracy, precision, recall, F1 and yes-ratio (share of "yes" predictions) over POPE records."""
    preds = [pope_label(r["prediction"]) for r in records]
    refs = [r["answers"][0].lower().strip() for r in records]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, refs))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, refs))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, refs))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": sum(p == g for p, g in zip(preds, refs)) / len(records), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": preds.count("yes") / len(records)}


def mme_aggregate(records: Sequence[dict]) -> dict:
    """Per category: mean over images (question_id) of acc + acc+ in percent; perception and cognition sums."""
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_cat[r["category"]][r["question_id"]].append(r["score"])
    cats = {}
    for cat, images in by_cat.items():
        total = 0.0
        for scores in images.values():
            total += sum(scores) / len(scores) * 100.0 + (100.0 if all(s == 1.0 for s in scores) else 0.0)
        cats[cat] = total / len(images)
    return {"perception": sum(v for k, v in cats.items() if k in MME_PERCEPTION),
            "cognition": sum(v for k, v in cats.items() if k in MME_COGNITION), "categories": cats}


def _mme_prompt(question: str) -> str:
    return question.strip().replace(" Please answer yes or no.", "") + SHORT_ANSWER


@dataclass(frozen=True)
class Preset:
    name: str
    question: str  # column
    answers: str  # column: a list of strings, a list of {"answer": ...}, or one string
    id: str  # column
    prompt: Callable[[str], str]
    score: Callable[[str, Sequence[str]], float]  # per record, in [0, 1]
    aggregate: Callable[[Sequence[dict]], dict]
    image_id: str | None = None  # column naming an image in an images folder when there is no image column
    meta: tuple[str, ...] = ()  # columns kept with each item (MME's category)


def _suffix(question: str) -> str:
    return question.strip() + SHORT_ANSWER


PRESETS = {
    "textvqa": Preset("textvqa", "question", "answers", "question_id", _suffix, vqa_accuracy, mean_score),
    "vqav2": Preset("vqav2", "question", "answers", "question_id", _suffix, vqa_accuracy, mean_score),
    "gqa": Preset("gqa", "question", "answer", "id", _suffix, gqa_exact_match, mean_score, image_id="imageId"),
    "pope": Preset("pope", "question", "answer", "question_id", _suffix, _yes_no_score(pope_label), pope_aggregate,
                   meta=("category",)),
    "mme": Preset("mme", "question", "answer", "question_id", _mme_prompt, _yes_no_score(mme_label), mme_aggregate,
                  meta=("category",)),
}
