"""What a campaign asks the model and how an answer is scored, for each data source of a scenario.

* synthetic -- the built-in task: the prediction is the most likely of the task's closed answer set;
* multiple_choice -- LLaVA's MMBench protocol: options listed in the prompt, scored by their letters;
* vqa_jsonl / vqa_folder -- open-ended: greedy generation, exact match against any reference answer;
* hf -- a benchmark from a local Hugging Face dataset (:mod:`robustvtc.data.hf`): the prompt is the question
  with the preset's lmms-eval suffix, greedy generation, scored by the benchmark's official metric. Records
  then carry ``score`` in [0, 1] (VQA soft accuracy, GQA exact match, POPE/MME yes/no) and ``correct`` =
  ``score >= 0.5`` (:data:`CORRECT_AT`), the 0/1 reading every paired statistic needs; POPE and MME records also
  carry ``category`` (and MME its image's ``question_id``) for :func:`robustvtc.data.hf.aggregate`.

Every task predicts through a :class:`~robustvtc.target.Target` with optional shared visual tokens, so the
campaign's one-encoder-pass-per-grid reuse holds whatever the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.base import VisualTokens
from ..target import Target
from .scenario import DataSpec


@dataclass(frozen=True)
class Item:
    id: int | str  # the record's ``sample``
    qtype: str
    question: str  # as the user wrote it (records); ``prompt`` is what the model reads
    prompt: str
    answer: str  # the reference attacks optimise against (whitebox, stealth)
    answers: tuple[str, ...]  # every accepted reference
    source: object  # a synthetic VQASample or an image path
    options: int = 0  # multiple choice: how many options the prompt lists
    meta: tuple[tuple[str, str], ...] = ()  # hf: the preset's extra columns (category, question_id) as pairs


# hf benchmarks: a record is "correct" when its official score is at least this (VQA accuracy: the answer of at
# least 2 of 10 annotators, 0.6; exact-match and yes/no metrics are 0 or 1 and unaffected)
CORRECT_AT = 0.5

_HASHES: dict[tuple, str] = {}


def file_sha256(path) -> str:
    """SHA-256 (16 hex digits) of a file's contents, streamed; cached per (path, size, mtime) in a process."""
    import hashlib
    import os

    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()[:16]
    return _HASHES[key]


class Task:
    def __init__(self, spec: DataSpec, samples: int):
        from ..errors import UserInputError

        self.spec = spec
        self.items = self._load(samples)
        if len(self.items) < samples:
            raise UserInputError(f"data: {spec.path} holds {len(self.items)} items but samples is {samples}; "
                                 f"accepted: samples <= {len(self.items)}")
        if spec.source != "synthetic":
            from ..images import open_image

            for item in self.items:  # every image decodes (size, mode, truncation) before the first unit
                open_image(item.source)

    def fingerprint(self) -> dict:
        """What the records depend on in the data, by content: a hash of the rows used (ids, questions,
        answers, options) and one per sample's image (``images``, by sample id, so the data folder may move;
        ``image_files`` says where each was read). The synthetic task is generated from its split."""
        import hashlib
        import json

        if self.spec.source == "synthetic":
            return {"rows": None, "images": {}, "image_files": {}}
        rows = [[str(i.id), i.question, i.prompt, i.answer, list(i.answers), i.options] for i in self.items]
        if self.spec.source == "hf":  # the preset and its columns decide the scores as much as the answers
            rows = [[self.spec.preset, *row, [list(m) for m in i.meta]] for row, i in zip(rows, self.items)]
        images = {str(i.id): file_sha256(i.source) for i in self.items}
        files = {str(i.id): str(i.source) for i in self.items}
        return {"rows": hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16], "images": images,
                "image_files": files}

    def _load(self, samples: int) -> list[Item]:
        from ..data import loaders
        from ..data import synthetic as S
        from ..scoring import multiple_choice_prompt

        s = self.spec
        if s.source == "synthetic":
            return [Item(x.index, x.qtype, x.question, x.question, x.answer, (x.answer,), x)
                    for x in S.generate_dataset(samples, s.split)]
        if s.source == "hf":
            from ..data.hf import load_hf

            out = []
            for x in load_hf(s.path, s.preset, split=s.split, samples=samples, image_root=s.image_root):
                meta = tuple((k, str(v)) for k, v in x.meta.items() if v is not None)
                qtype = dict(meta).get("category", s.preset)  # POPE / MME: by-type shows each category
                out.append(Item(x.id, qtype, x.question, x.prompt, max(set(x.answers), key=x.answers.count),
                                x.answers, x.image, meta=meta))
            return out
        if s.source == "multiple_choice":
            items = loaders.load_multiple_choice(s.path, s.image_root)[:samples]
            return [Item(x.id, "multiple_choice", x.question, multiple_choice_prompt(x.question, x.options), x.letter,
                         (x.letter,), x.image, len(x.options)) for x in items]
        rows = (loaders.load_vqa_jsonl(s.path, s.image_root) if s.source == "vqa_jsonl"
                else loaders.load_vqa_folder(s.path, s.csv_name, s.image_root))
        return [Item(x.id, "vqa", x.question, x.question, max(set(x.answers), key=x.answers.count), x.answers, x.image)
                for x in rows[:samples]]

    def pixels(self, items: Sequence[Item], adapter) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] at the model's input resolution, on its device."""
        if self.spec.source == "synthetic":
            from ..data import synthetic as S

            pixels = S.to_pixels([i.source for i in items], size=adapter.input_size[0])  # rendered at its size
        else:
            pixels = torch.cat([adapter.load_image(i.source) for i in items])
        return adapter.check_pixels(pixels).to(adapter.device)

    @torch.no_grad()
    def predict(self, target: Target, pixels: torch.Tensor, items: Sequence[Item],
                tokens: VisualTokens | None = None) -> list[str]:
        prompts = [i.prompt for i in items]
        if self.spec.source == "synthetic":
            from ..data.synthetic import ANSWERS

            return target.predict(pixels, prompts, ANSWERS, tokens=tokens)
        if self.spec.source == "multiple_choice":
            from ..scoring import letter_logprobs, option_letters

            scores = letter_logprobs(target, pixels, prompts, [i.options for i in items], tokens=tokens)
            return [option_letters(scores.shape[1])[j] for j in scores.argmax(-1).tolist()]
        fwd = target.forward(pixels, tokens)
        return target.adapter.generate(fwd.embeds, prompts, self.spec.max_new_tokens, in_llm=fwd.in_llm)

    def score(self, item: Item, prediction: str) -> float | None:
        """The benchmark's official per-record metric in [0, 1] (source hf), else None."""
        if self.spec.source != "hf":
            return None
        from ..data.presets import PRESETS

        return float(PRESETS[self.spec.preset].score(prediction, item.answers))

    def record_fields(self, item: Item, prediction: str) -> dict:
        """What a record carries besides the common fields: for hf, ``score`` and the preset's columns that
        :func:`robustvtc.data.hf.aggregate` reads (category, question_id); nothing for the other sources."""
        return self.judge(item, prediction)[1]

    def correct(self, item: Item, prediction: str) -> bool:
        return self.judge(item, prediction)[0]

    def judge(self, item: Item, prediction: str) -> tuple[bool, dict]:
        """(:meth:`correct`, :meth:`record_fields`) of one prediction, scoring it once."""
        from ..scoring import exact_match

        if self.spec.source in ("synthetic", "multiple_choice"):
            return prediction == item.answer, {}
        if self.spec.source == "hf":
            score = self.score(item, prediction)
            return score >= CORRECT_AT, {"score": score, **dict(item.meta)}
        return exact_match(prediction, item.answers) > 0, {}

