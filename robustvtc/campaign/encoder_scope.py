"""What an encoder-only campaign (``mode: encoder``) accepts, checked when its scenario is parsed, and the image
folders it reads.

An encoder screening sees only the vision encoder: grey-box attacks (threat model "encoder gradients only") and
compressors that plan from the encoder's tokens -- pre-LLM, in the vision space (not on projected LLM-input
embeddings), without the question. Everything else is refused in one line naming what would work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserInputError

# the files of an image folder (source images): what PIL decodes, by suffix
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
ENCODER_DATA = ("images", "synthetic")


def list_images(folder: str | Path) -> list[Path]:
    """Every image file directly in ``folder`` (by suffix, hidden files skipped), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"data: {folder} is not a folder; accepted: a folder of image files "
                             f"({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(f"data: {folder} holds no image file; accepted: a folder of image files "
                             f"({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
    return files


def encoder_attacks() -> list[str]:
    """Registered attacks an encoder-only campaign accepts (grey-box: encoder gradients only)."""
    from ..attacks import ATTACKS

    out = []
    for name in ATTACKS.names():
        try:
            if ATTACKS.get(name).threat.gradients == "encoder":
                out.append(name)
        except (UserInputError, AttributeError):  # a plug-in that fails to load is refused where it is used
            continue
    return out


def plans_from_encoder(cls) -> bool:
    """Whether a compressor class plans from the encoder's tokens alone: pre-LLM, vision space, no text."""
    return (getattr(cls, "stage", None) == "pre_llm" and getattr(cls, "space", "vision") == "vision"
            and not getattr(cls, "text_aware", False))


def encoder_compressors() -> list[str]:
    """Registered compressors an encoder-only campaign accepts (:func:`plans_from_encoder`)."""
    from ..compression import COMPRESSORS

    out = []
    for name in COMPRESSORS.names():
        try:
            if name != "none" and plans_from_encoder(COMPRESSORS.get(name)):
                out.append(name)
        except UserInputError:
            continue
    return out


def refuse_attack(name: str) -> str | None:
    """Why an encoder-only campaign refuses attack ``name`` (None: accepted)."""
    from ..attacks import attack_class

    cls = attack_class(name)
    if cls.threat.gradients != "encoder":
        return (f"{name} is a {cls.threat.describe().split(',')[0]} attack, and an encoder-only campaign has no LLM "
                f"to take gradients through; accepted: grey-box attacks ({', '.join(encoder_attacks())})")
    return None


def refuse_compressor(label: str, name: str) -> str | None:
    """Why an encoder-only campaign refuses compressor ``name`` (None: accepted)."""
    from ..compression import COMPRESSORS

    cls = COMPRESSORS.get(name)
    if plans_from_encoder(cls):
        return None
    if cls.stage == "in_llm":
        why = "decides inside the LLM"
    elif cls.stage == "in_encoder":
        why = "merges inside the encoder (it re-runs it)"
    elif getattr(cls, "space", "vision") != "vision":
        why = "plans on the projected LLM-input embeddings"
    else:
        why = "needs the question"
    return (f"{label} {why}, which an encoder-only campaign does not have; accepted: compressors that plan from the "
            f"encoder's tokens ({', '.join(encoder_compressors())})")


def check_encoder_scenario(c, out: dict[str, Any]) -> None:
    """Refuse, in one line naming the key, what an encoder-only campaign cannot run (``c``: the scenario's
    checker, ``out``: the validated keys)."""
    data = out["data"]
    if data.source not in ENCODER_DATA:
        c.fail("data.source", f"{data.source} holds questions an encoder-only campaign never asks",
               "images ({source: images, path: DIR}) or synthetic (its images) with mode: encoder")
    if not out["attacks"]:
        c.fail("attacks", "empty: an encoder-only campaign measures what attacks do to the tokens",
               f"one or more grey-box attacks ({', '.join(encoder_attacks())})")
    for i, spec in enumerate(out["attacks"]):
        if str(spec.name).startswith("torchattacks."):
            c.fail(f"attacks[{i}]", f"{spec.name} attacks the answers through the whole model",
                   f"grey-box attacks ({', '.join(encoder_attacks())})")
        problem = refuse_attack(spec.name)
        if problem:
            raise UserInputError(f"{c.source}: attacks[{i}]: {problem}")
    specs = out.get("compressor_specs") or {}
    for i, label in enumerate(out["compressors"]):
        if label == "none":
            continue
        problem = refuse_compressor(label, (specs.get(label) or {}).get("name", label))
        if problem:
            raise UserInputError(f"{c.source}: compressors: {problem}")
    if out.get("defenses"):
        c.fail("defenses", "an encoder-only campaign evaluates no defense", "[] or none (mode: full for defenses)")
    executor = out.get("executor")
    if executor is not None and executor.type != "local":
        c.fail("executor.type", f"{executor.type} is not yet supported for mode encoder", "local")
