"""What a scenario will do before it does it: ``robustvtc validate`` (the budgets against the model's config,
no weights loaded) and ``robustvtc run --dry-run`` (the resolved scenario, the units and records, and a time
estimate from a short timing probe that writes nothing)."""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from ..errors import UserInputError
from .scenario import Scenario


def visual_tokens_from_config(model: str) -> int | None:
    """The visual token count a fixed-resolution checkpoint gives its LLM -- LLaVA, InternVL (one tile), Gemma 3
    -- read from its config alone; None where the count depends on the image (dynamic-resolution families) or
    the config cannot be read offline."""
    from ..models import BUILTIN_MODELS

    path = BUILTIN_MODELS.get(model, Path(model).expanduser())
    config = _config_json(path)  # config.json as written: transformers is imported only to fill in defaults
    count = _token_count(config) if config else None
    if count is None and (config is None or config.get("model_type") in ("llava", "internvl", "gemma3")):
        try:
            from transformers import AutoConfig

            count = _token_count(AutoConfig.from_pretrained(str(path)).to_dict())
        except (OSError, ValueError):
            return None
    return count


def _token_count(config: dict) -> int | None:
    """The family's token count from a config dict; None when a key it needs is missing."""
    kind, vision = config.get("model_type"), config.get("vision_config")
    if not isinstance(vision, dict):
        return None
    if kind == "gemma3":  # the projector pools the patch grid to mm_tokens_per_image tokens
        count = config.get("mm_tokens_per_image")
        return count if isinstance(count, int) and not isinstance(count, bool) else None
    size, patch = (v[0] if isinstance(v, list) and v else v  # InternVL writes [height, width]
                   for v in (vision.get("image_size"), vision.get("patch_size")))
    if not isinstance(size, int) or not isinstance(patch, int) or patch <= 0:
        return None
    if kind == "internvl":  # one tile, pixel-shuffled by downsample_ratio per side
        ratio = config.get("downsample_ratio")
        return int(size // patch * ratio) ** 2 if isinstance(ratio, (int, float)) else None
    if kind == "llava" and "vision_feature_select_strategy" in config:
        return (size // patch) ** 2 + (1 if config["vision_feature_select_strategy"] == "full" else 0)
    return None


def _config_json(path: Path) -> dict | None:
    """A local checkpoint's config.json, or a hub checkpoint's from the local cache; None when not found."""
    import json

    file = Path(path) / "config.json"
    if not file.is_file():
        if Path(path).exists() or str(path).count("/") != 1:
            return None
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        found = try_to_load_from_cache(str(path), "config.json")
        if not isinstance(found, str):
            return None
        file = Path(found)
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_against_model_config(scenario: Scenario) -> int | None:
    """Refuse budgets above the model's visual token count when its config says it (one line naming the
    budget); returns the count, or None when only loading the model can tell."""
    tokens = visual_tokens_from_config(scenario.model)
    if tokens is None:
        return None
    for i, budget in enumerate(scenario.budgets):
        if budget != "all" and budget > tokens:
            raise UserInputError(f"budgets[{i}]: {budget} exceeds the {tokens} visual tokens of {scenario.model} (read "
                                 f"from its config); accepted: 1..{tokens} or 'all'")
    return tokens


def dry_run(scenario: Scenario, adapter=None) -> dict:
    """The resolved scenario, its units and records, and the time they should take, from timing one clean
    evaluation and one attack step of each attack on the first chunk (nothing is written)."""
    from .records import CLEAN
    from .runner import make_campaign

    campaign = make_campaign(scenario, adapter)
    units = campaign.units()
    records = sum(len(campaign.unit_keys(u)) for u in units)
    chunk = campaign.chunks[0]
    pixels = campaign.task.pixels(chunk, campaign.adapter)
    start = time.perf_counter()
    list(campaign.run_unit(units[0]))  # the first chunk's clean unit: one evaluation of the whole grid
    evaluation = time.perf_counter() - start
    step = {}
    for spec in scenario.attacks:
        attack = campaign.example_attack(spec.label)
        state = attack.prepare(pixels, [i.prompt for i in chunk], [i.answer for i in chunk], None)
        start = time.perf_counter()
        attack.gradient(pixels, pixels * 0, state)
        step[spec.label] = time.perf_counter() - start
    estimate = 0.0
    for unit in units:
        if unit.attack == CLEAN:
            estimate += evaluation
            continue
        groups = len(campaign._groups(unit))  # image sets: one craft per knowledge level (and defense)
        estimate += groups * (campaign.attacks[unit.attack].options["steps"] + 1) * step[unit.attack] + evaluation
    resolved = scenario.to_dict()
    text = "\n".join([
        "# resolved scenario", yaml.safe_dump(resolved, sort_keys=False).rstrip(), "",
        f"# {len(units)} units ({len(campaign.chunks)} chunks of up to {scenario.batch_size} samples x "
        f"{1 + sum(len(a.eps) for a in scenario.attacks)} clean/attack x eps), {records} records, "
        f"{len(campaign.cells)} cells",
        f"# timing probe on the first chunk: one grid evaluation {evaluation:.2f} s"
        + "".join(f", one {label} step {t:.2f} s" for label, t in step.items()),
        f"# estimate: about {_minutes(estimate)} (wall clock on this machine; model loading not included)"])
    return {"scenario": resolved, "units": len(units), "records": records, "cells": len(campaign.cells),
            "probe_seconds": {"evaluation": evaluation, **{f"step:{k}": v for k, v in step.items()}},
            "estimate_seconds": round(estimate, 1), "text": text}


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
