"""Command line: ``robustvtc evaluate | train-builtin | list``.

Exit codes: 0 success, 1 gate breached, 2 usage error (bad input; one line, no traceback), 3 runtime error.
"""
from __future__ import annotations

import os
import sys
from functools import wraps

import click

from .errors import UserInputError

EXIT_GATE, EXIT_USAGE, EXIT_RUNTIME = 1, 2, 3


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def handle_errors(fn):
    """User errors -> one line on stderr and exit 2; unexpected errors -> exit 3 (traceback only with --debug)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("ROBUSTVTC_DEBUG"):
                raise
            click.echo(f"runtime error: {type(exc).__name__}: {exc} (set ROBUSTVTC_DEBUG=1 for the traceback)", err=True)
            sys.exit(EXIT_RUNTIME)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="robustvtc")
def main() -> None:
    """Adversarial-robustness testing for vision-language models that compress their visual tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@main.command()
@click.option("--model", default="builtin", show_default=True, help="'builtin', a llava-hf directory or a hub id.")
@click.option("--compressors", default="none,random,fastervlm", show_default=True, help="Comma-separated names.")
@click.option("--budgets", default="16,32,48", show_default=True, help="Comma-separated token budgets ('all' = every token).")
@click.option("--samples", default=500, show_default=True, type=click.IntRange(min=1), help="Test-split samples.")
@click.option("--batch-size", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, help="Seed of randomised compressors.")
@click.option("--by-type", is_flag=True, help="Also print accuracy per question type.")
@click.option("--records", type=click.Path(dir_okay=False), help="Write the per-sample records to this CSV.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@handle_errors
def evaluate(model, compressors, budgets, samples, batch_size, seed, by_type, records, device, dtype):
    """Clean accuracy for every compressor x budget on the synthetic test split.

    \b
    Example:
      robustvtc evaluate --compressors none,random,fastervlm --budgets 16,32,48 --by-type
    """
    from .compression import COMPRESSORS
    from .evaluate import accuracy_table, evaluate as run_eval, parse_budgets
    from .models import load_model

    names = _csv(compressors)
    for name in names:
        COMPRESSORS.get(name)  # fail fast, before loading the model
    adapter = load_model(model, device=device, dtype=dtype)
    budget_list = parse_budgets(_csv(budgets), adapter.num_visual_tokens)
    from tqdm import tqdm

    with tqdm(total=samples, desc="evaluate", unit="img", disable=None, file=sys.stderr) as bar:
        df = run_eval(adapter, names, budget_list, samples=samples, seed=seed, batch_size=batch_size,
                      progress=bar.update)
    if records:
        df.to_csv(records, index=False)
    click.echo(f"Clean accuracy (%) of {adapter.name} on {samples} test samples; columns = visual tokens kept "
               f"(of {adapter.num_visual_tokens})")
    click.echo(accuracy_table(df).to_string(na_rep="-"))
    if by_type:
        click.echo("\nPer question type:")
        click.echo(accuracy_table(df, by_type=True).to_string(na_rep="-"))


@main.command("train-builtin")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory (default: the package's built-in model folder).")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Override the recipe's step count.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@handle_errors
def train_builtin_cmd(out, steps, batch_size, seed):
    """Reproduce the shipped built-in model from scratch (about 20 minutes on 2 CPU cores).

    \b
    Example (a smoke run):
      robustvtc train-builtin --out /tmp/builtin --steps 3 --batch-size 4
    """
    from dataclasses import replace
    from pathlib import Path

    from .models.builtin import BUILTIN_DIR
    from .training import TrainConfig, train_builtin

    cfg = TrainConfig(seed=seed)
    if steps:
        cfg = replace(cfg, steps=steps, eval_every=min(cfg.eval_every, steps))
    if batch_size:
        cfg = replace(cfg, batch_size=batch_size)
    report = train_builtin(Path(out) if out else BUILTIN_DIR, cfg, log=lambda m: click.echo(m, err=True))
    click.echo(f"trained in {report['train_seconds']} s; final val accuracy {report['history'][-1]['val_accuracy']:.3f}")


@main.command("list")
@click.argument("kind", type=click.Choice(["models", "compressors", "attacks", "defenses", "scenarios"]))
@click.argument("pattern", default="*")
@handle_errors
def list_cmd(kind, pattern):
    """List registered plugins (wildcards allowed), e.g. ``robustvtc list compressors 'prune*'``."""
    if kind == "models":
        from .models import list_models

        for name in list_models():
            click.echo(name)
    elif kind == "compressors":
        from .compression import COMPRESSORS

        rows = [(n, c.stage, "yes" if c.text_aware else "no", c.native_knob) for n, c in COMPRESSORS.items()
                if n in COMPRESSORS.names(pattern)]
        _print_rows(("name", "stage", "text-aware", "native knob"), rows)
    else:
        click.echo(f"no {kind} registered yet")


def _print_rows(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
