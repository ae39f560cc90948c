"""Real evaluation data from files: VQA-style JSONL, a folder of images with a CSV, multiple-choice items.

Formats (docs/data.md has examples):

* VQA JSONL -- one JSON object per line: ``image`` (path), ``question``, ``answers`` (list of strings, all
  human answers with repeats) or ``answer`` (one string); optional ``id``.
* image folder + CSV -- a CSV (default ``questions.csv`` inside the folder) with columns ``image``,
  ``question`` and ``answers`` (several separated by ``|``) or ``answer``; optional ``id``.
* multiple choice, JSONL or CSV -- ``image``, ``question``, the options (JSONL: ``options`` list; CSV:
  columns ``A``, ``B``, ... left empty past an item's last option) and ``answer``, the correct option as a
  letter ("B") or a 0-based index; optional ``id``.

Relative image paths resolve against ``image_root`` (default: the folder of the data file). Every problem
is one :class:`UserInputError` line naming the file, the line or row, what is wrong and the accepted format.
"""
from __future__ import annotations

import csv
import io
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import UserInputError

VQA_JSONL = ('one JSON object per line with "image" (path), "question" and "answers" (list of strings) or '
             '"answer" (string), optional "id"')
VQA_CSV = "CSV columns image, question and answers ('|'-separated) or answer, optional id"
MC_FORMAT = ('JSONL with "image", "question", "options" (list of >= 2 strings), "answer" (letter or 0-based '
             'index), optional "id"; or CSV columns image, question, A, B[, C, ...], answer[, id]')


@dataclass(frozen=True)
class VQAItem:
    id: str
    image: Path
    question: str
    answers: tuple[str, ...]  # all reference answers, repeats kept (VQA soft accuracy counts them)


@dataclass(frozen=True)
class MultipleChoiceItem:
    id: str
    image: Path
    question: str
    options: tuple[str, ...]
    answer: int  # index into options

    @property
    def letter(self) -> str:
        return string.ascii_uppercase[self.answer]


def load_vqa_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[VQAItem]:
    """VQA items from a JSONL file (see the module docstring for the format)."""
    items, wheres = [], []
    for where, row in _jsonl_rows(path, VQA_JSONL):
        answers = row.get("answers", row.get("answer"))
        answers = [answers] if isinstance(answers, str) else answers
        wheres.append(where)
        items.append(VQAItem(_id(row, where), _image(row, path, image_root, where, VQA_JSONL),
                             _text(row, "question", where, VQA_JSONL), _answers(answers, where, VQA_JSONL)))
    return _non_empty(items, path, VQA_JSONL, wheres)


def load_vqa_folder(folder: str | Path, csv_name: str = "questions.csv",
                    image_root: str | Path | None = None) -> list[VQAItem]:
    """VQA items from a folder of images and a CSV in it (image paths relative to the folder by default)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"image folder not found: {folder}; accepted: a folder holding the images and {csv_name}")
    path = folder / csv_name
    root = image_root if image_root is not None else folder
    items, wheres = [], []
    for where, row in _csv_rows(path, ("image", "question"), ("answers", "answer"), VQA_CSV):
        raw = row.get("answers") or row.get("answer") or ""
        answers = [a.strip() for a in raw.split("|")] if row.get("answers") else [raw.strip()]
        wheres.append(where)
        items.append(VQAItem(_id(row, where), _image(row, path, root, where, VQA_CSV),
                             _text(row, "question", where, VQA_CSV), _answers(answers, where, VQA_CSV)))
    return _non_empty(items, path, VQA_CSV, wheres)


def load_multiple_choice(path: str | Path, image_root: str | Path | None = None) -> list[MultipleChoiceItem]:
    """Multiple-choice items from a .jsonl or .csv file (see the module docstring for the format)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, ("image", "question", "A", "B", "answer"), (), MC_FORMAT)
        options_of = _csv_options
    else:
        rows = _jsonl_rows(path, MC_FORMAT)
        options_of = _jsonl_options
    items, wheres = [], []
    for where, row in rows:
        options = options_of(row, where)
        wheres.append(where)
        items.append(MultipleChoiceItem(_id(row, where), _image(row, path, image_root, where, MC_FORMAT),
                                        _text(row, "question", where, MC_FORMAT), options,
                                        _choice(row.get("answer"), len(options), where)))
    return _non_empty(items, path, MC_FORMAT, wheres)


def load_pixels(items: Sequence[VQAItem | MultipleChoiceItem], adapter) -> torch.Tensor:
    """(B, 3, H, W) pixels of the items' images at the adapter's input resolution (``adapter.load_image``)."""
    return torch.cat([adapter.load_image(item.image) for item in items])


# ---------------------------------------------------------------------------------------------- parsing helpers
def _open(path: str | Path, accepted: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"data file not found: {path}; accepted: {accepted}")
    return path


def _utf8_text(path: Path, accepted: str) -> str:
    """The file's text; a file that is not UTF-8 text is one line naming it and the byte."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not UTF-8 text (byte {exc.start}); accepted: a UTF-8 file with {accepted}") \
            from None


def _jsonl_rows(path: str | Path, accepted: str) -> Iterator[tuple[str, dict]]:
    path = _open(path, accepted)
    for number, line in enumerate(io.StringIO(_utf8_text(path, accepted)), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{where}: not valid JSON ({exc.msg}); accepted: {accepted}") from None
        if not isinstance(row, dict):
            raise UserInputError(f"{where}: expected a JSON object, got {type(row).__name__}; accepted: {accepted}")
        yield where, row


def _csv_rows(path: Path, required: Sequence[str], one_of: Sequence[str], accepted: str) -> Iterator[tuple[str, dict]]:
    path = _open(path, accepted)
    reader = csv.DictReader(io.StringIO(_utf8_text(path, accepted), newline=""))
    columns = set(reader.fieldnames or [])
    missing = [c for c in required if c not in columns]
    if one_of and not columns & set(one_of):
        missing.append(" or ".join(one_of))
    if missing:
        raise UserInputError(f"{path} lacks column(s) {', '.join(missing)}; accepted: {accepted}")
    for number, row in enumerate(reader, 2):  # line 1 is the header
        if None in row:
            raise UserInputError(f"{path}:{number}: more fields than columns; accepted: {accepted}")
        yield f"{path}:{number}", row


def _id(row: dict, where: str) -> str:
    value = row.get("id")
    return str(value) if value not in (None, "") else where.rsplit(":", 1)[1]


def _text(row: dict, key: str, where: str, accepted: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        problem = "missing" if value is None else f"must be a non-empty string, got {value!r}"
        raise UserInputError(f"{where}: field {key!r} {problem}; accepted: {accepted}")
    return value.strip()


def _answers(answers, where: str, accepted: str) -> tuple[str, ...]:
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise UserInputError(f"{where}: answers must be a non-empty list of non-empty strings, got {answers!r}; "
                             f"accepted: {accepted}")
    return tuple(a.strip() for a in answers)


def _image(row: dict, data_file: str | Path, image_root, where: str, accepted: str) -> Path:
    image = Path(_text(row, "image", where, accepted)).expanduser()
    if not image.is_absolute():
        image = Path(image_root if image_root is not None else Path(data_file).parent) / image
    if not image.is_file():
        raise UserInputError(f"{where}: image file not found: {image}; relative paths resolve against "
                             f"{Path(image_root) if image_root is not None else Path(data_file).parent}")
    return image


def _jsonl_options(row: dict, where: str) -> tuple[str, ...]:
    options = row.get("options")
    if (not isinstance(options, list) or not 2 <= len(options) <= 26
            or not all(isinstance(o, str) and o.strip() for o in options)):
        raise UserInputError(f"{where}: options must be a list of 2..26 non-empty strings, got {options!r}; "
                             f"accepted: {MC_FORMAT}")
    return tuple(o.strip() for o in options)


def _csv_options(row: dict, where: str) -> tuple[str, ...]:
    options = []
    for letter in string.ascii_uppercase:
        value = (row.get(letter) or "").strip()
        if not value:
            break
        options.append(value)
    if len(options) < 2:
        raise UserInputError(f"{where}: options A and B must be non-empty; accepted: {MC_FORMAT}")
    return tuple(options)


def _choice(answer, n: int, where: str) -> int:
    """A letter ("b", "B") or a 0-based index (int or digit string) -> index, checked against ``n`` options."""
    letters = string.ascii_uppercase[:n]
    if isinstance(answer, str):
        text = answer.strip().upper()
        if len(text) == 1 and text in letters:
            return letters.index(text)
        if text.isdigit():
            answer = int(text)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n:
        return answer
    raise UserInputError(f"{where}: answer {answer!r} is not one of the {n} options; accepted: a letter "
                         f"{letters[0]}..{letters[-1]} or an index 0..{n - 1}")


def _non_empty(items: list, path, accepted: str, wheres: list[str] | None = None) -> list:
    if not items:
        raise UserInputError(f"{path} holds no items; accepted: {accepted}")
    first: dict[str, str] = {}
    for item, where in zip(items, wheres or [f"{path} item {n + 1}" for n in range(len(items))]):
        if item.id in first:  # records are keyed by id: a second item would silently replace the first's
            raise UserInputError(f"{first[item.id]} and {where} share the id {item.id!r}; accepted: a distinct id "
                                 "per item")
        first[item.id] = where
    return items
