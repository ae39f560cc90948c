"""Accuracy under every attack at equal ε and steps, for each compressor x budget and for all tokens.

Rows are attacks, columns ``<compressor>@<budget>`` plus "all tokens"; cells are accuracy (%) on the
synthetic test split. Each adversarial image is built once for what its attack may know and then
evaluated on every cell that knowledge covers:

* clean, fulltoken, cage, whitebox-full (budget- and compressor-agnostic): built once per sample,
  evaluated on every cell;
* known_budget: built once per budget K, evaluated on every compressor at K (no all-tokens cell);
* whitebox (through the compressor) and stealth: built per cell, evaluated on that cell; the all-tokens
  cell of whitebox is whitebox-full (the same attack on the uncompressed model);
* "stealth (full tokens)": the stealth images of each cell evaluated on the full-token model -- a stealthy
  attack keeps this row high while the stealth row drops.

Every evaluation of an image set shares one encoder pass across the grid.

    python -m robustvtc.attack_table --samples 50 --steps 20
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

import click
import pandas as pd
import torch

from .compression import COMPRESSORS
from .data import synthetic as S
from .errors import UserInputError
from .evaluate import build_targets, parse_budgets
from .target import Target

ROWS = ("fulltoken", "cage", "known_budget", "whitebox-full", "whitebox", "stealth")
PREFERRED_COMPRESSORS = ("visionzip", "fastervlm")
ALL = "all tokens"


def _label(target: Target) -> str:
    return f"{target.compressor.name}@{target.budget}"


def attack_table(model="builtin", compressors: Sequence[str] | None = None, budgets: Sequence[int | str] = (16, 32, 48),
                 eps: float | str = "8/255", steps: int = 20, samples: int = 50, attacks: Sequence[str] = ROWS,
                 norm: str = "Linf", random_start: bool | None = None, eot_samples: int = 1, batch_size: int = 25,
                 seed: int = 0, device: str = "cpu", dtype: str = "float32", show: Callable[[str], None] | None = print,
                 progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Print and return the accuracy table (%); ``table.attrs["records"]`` holds the per-sample records.

    ``model``: a model name for :func:`robustvtc.models.load_model` or an adapter. ``compressors``: None =
    those of VisionZip and FasterVLM that are registered. ``random_start``: None = each attack's default.
    ``eot_samples`` applies to attacks built through a randomised target (compressor or defense).
    """
    from .attacks import get_attack
    from .attacks.base import parse_eps

    parse_eps(eps)  # fail fast, before loading a model
    unknown = [a for a in attacks if a not in ROWS]
    if unknown:
        raise UserInputError(f"unknown attack row {', '.join(unknown)}; accepted: {', '.join(ROWS)}")
    if compressors is None:
        compressors = [c for c in PREFERRED_COMPRESSORS if c in COMPRESSORS]
    compressors = [c for c in compressors if c != "none"]  # the all-tokens column is always there
    for name in compressors:
        COMPRESSORS.get(name)
    if isinstance(model, str):
        from .models import load_model

        adapter = load_model(model, device=device, dtype=dtype)
    else:
        adapter = model
    cells = build_targets(adapter, compressors, parse_budgets(budgets, adapter.num_visual_tokens), seed)
    full = Target(adapter)
    layers = sorted({layer for t in cells for layer in t.signal_layers})
    common = {"eps": eps, "norm": norm, "steps": steps, "seed": seed}
    if random_start is not None:
        common["random_start"] = random_start

    def options(target: Target) -> dict:
        return {**common, "eot_samples": eot_samples if target.randomized else 1}

    records: list[dict] = []
    data = S.generate_dataset(samples, "test")
    for start in range(0, samples, batch_size):
        chunk = data[start:start + batch_size]
        clean = S.to_pixels(chunk).to(adapter.device)
        questions, answers = [s.question for s in chunk], [s.answer for s in chunk]

        def record(row: str, images: torch.Tensor, targets: Sequence[Target], column: str | None = None) -> None:
            with torch.no_grad():
                tokens = adapter.encode(images, layers)
                for target in targets:
                    preds = target.predict(images, questions, S.ANSWERS, tokens=tokens)
                    col = column or (ALL if target is full else _label(target))
                    records.extend({"attack": row, "column": col, "sample": s.index, "correct": p == s.answer}
                                   for s, p in zip(chunk, preds))

        record("clean", clean, [*cells, full])
        whitebox_full = None
        for row in attacks:
            if row in ("fulltoken", "cage"):
                record(row, get_attack(row, adapter, **common)(clean).adv, [*cells, full])
            elif row == "known_budget":
                for budget in sorted({t.budget for t in cells}):
                    adv = get_attack(row, adapter, budget=budget, **common)(clean).adv
                    record(row, adv, [t for t in cells if t.budget == budget])
            elif row in ("whitebox-full", "whitebox"):
                if whitebox_full is None:
                    whitebox_full = get_attack("whitebox", full, path="full", **common)(clean, questions, answers).adv
                if row == "whitebox-full":
                    record(row, whitebox_full, [*cells, full])
                    continue
                record(row, whitebox_full, [full])
                for target in cells:
                    record(row, get_attack(row, target, **options(target))(clean, questions, answers).adv, [target])
            else:  # stealth
                for target in cells:
                    adv = get_attack(row, target, **options(target))(clean, questions, answers).adv
                    record(row, adv, [target])
                    record(f"{row} (full tokens)", adv, [full], column=_label(target))
        if progress is not None:
            progress(len(chunk))

    frame = pd.DataFrame.from_records(records)
    table = (frame.pivot_table(index="attack", columns="column", values="correct", aggfunc="mean") * 100).round(1)
    row_order = ["clean", *attacks, *(["stealth (full tokens)"] if "stealth" in attacks else [])]
    table = table.reindex(index=row_order, columns=[*map(_label, cells), ALL])
    table.attrs["records"] = frame
    if show is not None:
        show(f"model {adapter.name}: accuracy (%) on {samples} test samples, {norm} eps={parse_eps(eps):.4g} "
             f"({eps}), {steps} steps each")
        show(table.to_string(na_rep="-"))
    return table


@click.command("attack-table", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="builtin", show_default=True, help="'builtin', a llava-hf directory or a hub id.")
@click.option("--compressors", default=None, help="Comma-separated names [default: visionzip,fastervlm, as registered].")
@click.option("--budgets", default="16,32,48", show_default=True, help="Comma-separated token budgets.")
@click.option("--eps", default="8/255", show_default=True, help="Radius in [0,1] pixel space, e.g. 8/255 or 0.5.")
@click.option("--norm", type=click.Choice(["Linf", "L2"]), default="Linf", show_default=True)
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=0), help="PGD steps, equal for all.")
@click.option("--samples", default=50, show_default=True, type=click.IntRange(min=1), help="Test-split samples.")
@click.option("--attacks", default=",".join(ROWS), show_default=True, help="Comma-separated rows.")
@click.option("--random-start/--no-random-start", default=None, help="Override every attack's default start.")
@click.option("--eot-samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="EOT draws for attacks through randomised compressors.")
@click.option("--batch-size", default=25, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the table to this CSV file.")
def command(model, compressors, budgets, eps, norm, steps, samples, attacks, random_start, eot_samples, batch_size,
            seed, device, dtype, csv_path):
    """Accuracy under every attack at equal eps and steps, per compressor x budget and for all tokens.

    \b
    Example:
      python -m robustvtc.attack_table --samples 50 --steps 20 --eps 8/255
    """
    from tqdm import tqdm

    from .cli import handle_errors

    def csv(value):
        return None if value is None else [v.strip() for v in value.split(",") if v.strip()]

    @handle_errors
    def run():
        with tqdm(total=samples, desc="attack table", unit="img", disable=None, file=sys.stderr) as bar:
            table = attack_table(model, csv(compressors), csv(budgets), eps, steps, samples, csv(attacks), norm,
                                 random_start, eot_samples, batch_size, seed, device, dtype, show=click.echo,
                                 progress=bar.update)
        if csv_path:
            table.to_csv(csv_path)

    run()


if __name__ == "__main__":
    command()
