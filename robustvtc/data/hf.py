"""Benchmarks from Hugging Face datasets on disk -- never downloaded.

``load_hf(path, preset)`` reads a dataset saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
(a folder with dataset_info.json / dataset_dict.json), or parquet / arrow files (a file, a folder of them, or a
glob), and maps its columns with a :mod:`~robustvtc.data.presets` preset (textvqa, vqav2, gqa, pope, mme).
Images stored in the dataset (bytes) are written once, under their content hash, to ``image_dir`` (default
``~/.cache/robustvtc/hf_images``) so that the rest of robustvtc reads files as for any other data; images
stored as paths are used where they are. GQA's instructions carry an ``imageId``: pass the folder of its
images as ``image_root`` (``<imageId>.jpg`` / ``.png``).
"""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserInputError
from .presets import PRESETS, Preset


@dataclass(frozen=True)
class BenchmarkItem:
    id: str
    image: Path
    question: str  # as in the dataset
    prompt: str  # what the model reads: the question with the preset's suffix
    answers: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False)


def _default_image_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "robustvtc" / "hf_images"


def _open(path: str | Path, split: str | None):
    """The dataset at ``path`` (save_to_disk folder, or parquet/arrow files), offline, one split."""
    import datasets

    p = Path(path).expanduser()
    files = sorted(glob.glob(str(p))) if any(ch in str(path) for ch in "*?[") else None
    if files is None and p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                if len(ds) != 1:
                    raise UserInputError(f"data.path {p} holds splits {', '.join(ds)}; accepted: data.split naming one")
                split = next(iter(ds))
            if split not in ds:
                raise UserInputError(f"data.split {split!r} not in {p}; accepted: {', '.join(ds)}")
            ds = ds[split]
        return ds
    if files is None:
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.suffix in (".parquet", ".arrow"))
            if split is not None:
                files = [f for f in files if Path(f).name.startswith(split) or f"/{split}/" in f] or files
        elif p.is_file():
            files = [str(p)]
        else:
            raise UserInputError(f"data.path not found: {p}; accepted: a save_to_disk folder or parquet/arrow files")
    if not files:
        raise UserInputError(f"data.path {p} holds no parquet or arrow files; accepted: a save_to_disk folder or "
                             "parquet/arrow files")
    kinds = {Path(f).suffix for f in files}
    if len(kinds) != 1 or kinds - {".parquet", ".arrow"}:
        raise UserInputError(f"data.path {path}: mixed or unknown file kinds {sorted(kinds)}; accepted: .parquet or "
                             ".arrow files")
    if kinds == {".arrow"}:
        return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
    return datasets.Dataset.from_parquet(files)


def _answers(value, preset: Preset, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict) and "answer" in value:  # a column of structs read as a dict of lists
        value = value["answer"]
    out = []
    for v in value or []:
        v = v.get("answer") if isinstance(v, dict) else v
        if not isinstance(v, str):
            raise UserInputError(f"{where}: column {preset.answers!r} holds {type(v).__name__}; accepted: strings or "
                                 "{'answer': string} entries")
        out.append(v)
    if not out:
        raise UserInputError(f"{where}: column {preset.answers!r} is empty; accepted: at least one answer")
    return tuple(out)


def _image_file(image, row: dict, preset: Preset, image_dir: Path, image_root: Path | None, where: str) -> Path:
    if image is None and preset.image_id and image_root is not None:
        stem = str(row[preset.image_id])
        for ext in (".jpg", ".jpeg", ".png"):
            if (image_root / f"{stem}{ext}").is_file():
                return image_root / f"{stem}{ext}"
        raise UserInputError(f"{where}: no image {stem}.jpg or .png in {image_root}")
    if isinstance(image, dict) and image.get("bytes"):
        data = image["bytes"]
        ext = Path(image.get("path") or "").suffix.lower() or ".png"
        target = image_dir / f"{hashlib.sha256(data).hexdigest()[:32]}{ext}"
        if not target.is_file():
            image_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return target
    if isinstance(image, dict) and image.get("path"):
        path = Path(image["path"])
        path = path if path.is_absolute() or image_root is None else image_root / path
        if path.is_file():
            return path
        raise UserInputError(f"{where}: image file not found: {path}")
    raise UserInputError(f"{where}: no image (column 'image' missing or empty"
                         + (f", and no {preset.image_id!r} + data.image_root" if preset.image_id else "")
                         + "); accepted: an Image column, or image paths")


def load_hf(path: str | Path, preset: str, split: str | None = None, samples: int | None = None,
            image_root: str | Path | None = None, image_dir: str | Path | None = None) -> list[BenchmarkItem]:
    """The first ``samples`` items (all when None) of a local dataset, mapped by ``preset``."""
    import datasets

    if preset not in PRESETS:
        raise UserInputError(f"unknown data.preset {preset!r}; accepted: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    ds = _open(path, split)
    missing = [c for c in (p.question, p.answers) if c not in ds.column_names]
    if missing:
        raise UserInputError(f"data.path {path} lacks column {missing[0]!r} of preset {preset}; columns: "
                             f"{', '.join(ds.column_names)}")
    if "image" in ds.column_names and isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    if samples is not None:
        ds = ds.select(range(min(samples, len(ds))))
    root = Path(image_root).expanduser() if image_root is not None else None
    out_dir = Path(image_dir).expanduser() if image_dir is not None else _default_image_dir()
    items = []
    for i, row in enumerate(ds):
        where = f"{path} row {i}"
        question = row[p.question]
        if not isinstance(question, str) or not question.strip():
            raise UserInputError(f"{where}: column {p.question!r} must be a non-empty string")
        item_id = str(row[p.id]) if p.id in row and row[p.id] is not None else str(i)
        items.append(BenchmarkItem(
            item_id if preset != "mme" else f"{item_id}#{i}",
            _image_file(row.get("image"), row, p, out_dir, root, where), question, p.prompt(question),
            _answers(row[p.answers], p, where),
            {"question_id": item_id, **{k: row[k] for k in p.meta if k in row}}))
    if not items:
        raise UserInputError(f"data.path {path} holds no items")
    return items


def score(preset: str, prediction: str, item: BenchmarkItem) -> float:
    """The preset's per-record metric in [0, 1] (VQA accuracy is fractional)."""
    return PRESETS[preset].score(prediction, item.answers)


def aggregate(preset: str, records: list[dict]) -> dict:
    """The benchmark's official figures from records with ``prediction``, ``answers``, ``score`` (and MME's
    ``question_id`` and ``category``)."""
    return PRESETS[preset].aggregate(records)
